"""The Space as the Hub runs it: `hf-vlm push-space` uploads spaces/ with the models' repo ids filled in and the hf-vlm
wheel in wheels/; the pushed folder is downloaded, a fresh virtualenv is made from its requirements.txt alone, and its
app.py is served from there, pulling the tiny models by repo id from the local Hub endpoint, then driven in headless
Chromium (caption, VQA, zero-shot).

Offline, the fresh virtualenv cannot download from PyPI: each PyPI line of requirements.txt (and each dependency of
the wheel) must be met by the version installed in the project venv, which the fresh venv sees as a plain path
(tests/wheel_env.py); lines that are paths are installed from the downloaded folder, as pip would on the Hub.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from huggingface_hub import SpaceCard, snapshot_download
from test_space import save_tiny_blip2, save_tiny_coca
from wheel_env import built_dist, clean_env, install, make_venv

from hf_vlm.hub import push_to_hub
from hf_vlm.hub.space import render_space
from hf_vlm.testing_hub import LocalHub

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]

TOKEN = "hf_local_alice_write_0123456789"
MODELS = {"blip2": "org/blip2-tiny", "coca": "org/coca-tiny"}
SPACE = "org/hf-vlm-demo"


def test_the_rendered_space_names_the_models_and_installs_hf_vlm_from_its_own_folder(tmp_path):
    wheel = tmp_path / "hf_vlm-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a wheel")
    files = render_space(tmp_path / "space", wheel=wheel, **MODELS)
    assert files == ["README.md", "app.py", "requirements.txt", f"wheels/{wheel.name}"]
    requirements = (tmp_path / "space" / "requirements.txt").read_text()
    assert f"./wheels/{wheel.name}\n" in requirements and "\nhf-vlm\n" not in requirements
    card = SpaceCard.load(tmp_path / "space" / "README.md").data
    assert card.models == card.preload_from_hub == list(MODELS.values())
    assert card.suggested_hardware == "zero-a10g" and card.app_file == "app.py"
    app = (tmp_path / "space" / "app.py").read_text()
    assert ("SETTINGS: dict[str, str] = {'HF_VLM_BLIP2': 'org/blip2-tiny', 'HF_VLM_COCA': 'org/coca-tiny', "
            "'HF_VLM_CPU_DTYPE': 'bfloat16'}") in app

    published = render_space(tmp_path / "published", coca="org/coca", requirement="hf-vlm==0.1.0")
    assert "wheels" not in "".join(published)
    assert "hf-vlm==0.1.0\n" in (tmp_path / "published" / "requirements.txt").read_text()


def test_a_space_without_models_or_without_hf_vlm_is_refused(tmp_path):
    from hf_vlm.hub import HubPushError

    with pytest.raises(HubPushError, match="at least one model"):
        render_space(tmp_path / "a", requirement="hf-vlm==0.1.0")
    with pytest.raises(HubPushError, match="either the hf-vlm wheel"):
        render_space(tmp_path / "b", coca="org/coca")
    with pytest.raises(HubPushError, match="is not an hf-vlm wheel"):
        render_space(tmp_path / "c", coca="org/coca", wheel=tmp_path / "missing.whl")


def _requirement_met(python: Path, line: str, cwd: Path) -> None:
    """Assert that `line` of a requirements file is met in the venv of `python` (see the module docstring)."""
    code = ("import sys\nfrom importlib.metadata import version\nfrom packaging.requirements import Requirement\n"
            "r = Requirement(sys.argv[1])\nv = version(r.name)\n"
            "assert r.specifier.contains(v, prereleases=True), f'{r}: {v} installed'\nprint(r.name, v)")
    result = subprocess.run([str(python), "-c", code, line], cwd=cwd, capture_output=True, text=True,
                            env=clean_env(), timeout=120)
    assert result.returncode == 0, f"requirement {line!r} is not met: {result.stderr[-2000:]}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, t5_tokenizer_dir):
    """The local Hub with both tiny models and the Space pushed by `hf-vlm push-space` (the wheel included)."""
    from hf_vlm.cli import main

    root = tmp_path_factory.mktemp("space_hub")
    wheel = built_dist(tmp_path_factory)["wheel"]
    with LocalHub(tokens={TOKEN: "alice"}, orgs={"alice": ["org"]}) as server:
        with pytest.MonkeyPatch.context() as mp:
            server.point_client_here(mp, root / "pusher_home", TOKEN)
            push_to_hub(save_tiny_blip2(root / "blip2", t5_tokenizer_dir), MODELS["blip2"])
            push_to_hub(save_tiny_coca(root / "coca"), MODELS["coca"])
            assert main(["push-space", SPACE, "--wheel", str(wheel), "--blip2", MODELS["blip2"],
                         "--coca", MODELS["coca"]]) == 0
            folder = Path(snapshot_download(SPACE, repo_type="space", local_dir=root / "space"))
        yield {"server": server, "root": root, "folder": folder, "wheel": wheel}


@pytest.fixture(scope="module")
def space_url(hub):
    """The pushed folder served as the Hub would: a venv from its requirements.txt, then `python app.py`."""
    folder, root = hub["folder"], hub["root"]
    python = make_venv(root / "space_venv")
    lines = [line.split("#")[0].strip() for line in (folder / "requirements.txt").read_text().splitlines()]
    for line in filter(None, lines):
        if line.startswith(("./", "../", "/")) or line.endswith(".whl"):
            install(python, folder / line)
        else:
            _requirement_met(python, line, folder)
    requires = subprocess.run(
        [str(python), "-c", "from importlib.metadata import requires\n"
                            "print('\\n'.join(r for r in requires('hf-vlm') if 'extra ==' not in r))"],
        capture_output=True, text=True, env=clean_env(), cwd=folder, check=True).stdout.split("\n")
    for requirement in filter(None, requires):  # the wheel's own dependencies, as pip would resolve them
        _requirement_met(python, requirement, folder)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(**hub["server"].client_env(), HF_HOME=str(root / "space_home"), GRADIO_SERVER_NAME="127.0.0.1",
                    GRADIO_SERVER_PORT=str(port))
    log = (root / "space.log").open("w")
    server = subprocess.Popen([str(python), "app.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while server.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"the Space did not start:\n{(root / 'space.log').read_text()[-5000:]}")
    yield f"http://127.0.0.1:{port}/"
    server.terminate()
    server.wait(timeout=60)
    log.close()


def test_the_space_serves_from_its_own_folder_with_the_models_pulled_by_repo_id(hub, space_url):
    import hf_vlm

    # The app imported hf_vlm from the fresh venv (the wheel), not from this checkout.
    venv_hf_vlm = subprocess.run([str(hub["root"] / "space_venv" / "bin" / "python"), "-c",
                                  "import hf_vlm; print(hf_vlm.__file__)"], capture_output=True, text=True,
                                 env=clean_env(), cwd=hub["folder"], check=True).stdout.strip()
    assert venv_hf_vlm.startswith(str(hub["root"] / "space_venv")) and venv_hf_vlm != hf_vlm.__file__
    requests = " ".join(str(r) for r in hub["server"].requests)
    for repo_id in MODELS.values():
        assert repo_id in requests  # pulled from the endpoint by repo id


@pytest.mark.browser
def test_in_the_browser_the_pushed_space_captions_answers_and_classifies(space_url, hub):
    from playwright.sync_api import expect

    from hf_vlm.space import photos_folder
    from hf_vlm.testing import require, require_executable

    chromium = require_executable("chromium", "make system-deps (apt-get install -y chromium)")
    sync_api = require("playwright.sync_api", "pip install playwright (part of hf-vlm[dev])")
    photo = hub["folder"].parent / "cat.jpg"
    photo.write_bytes((photos_folder() / "cat.jpg").read_bytes())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(space_url)
        expect(page.locator("#models")).to_contain_text("org/blip2-tiny")
        expect(page.locator("#models")).to_contain_text("(cpu, bfloat16)")  # the pushed Space's low-memory path

        page.get_by_role("tab", name="Caption").click()
        page.locator("#caption-image input[type=file]").set_input_files(str(photo))
        page.click("#caption-button")
        expect(page.locator("#coca-caption textarea")).not_to_have_value("")
        expect(page.locator("#blip2-caption textarea")).not_to_have_value("")

        page.get_by_role("tab", name="Visual question answering").click()
        page.locator("#vqa-image input[type=file]").set_input_files(str(photo))
        page.fill("#vqa-question textarea", "what animal is this?")
        page.click("#vqa-button")
        expect(page.locator("#vqa-prompt textarea")).to_have_value("Question: what animal is this? Short answer:")

        page.get_by_role("tab", name="Zero-shot classification").click()
        page.locator("#zero-shot-image input[type=file]").set_input_files(str(photo))
        page.fill("#zero-shot-labels textarea", "cat, dog, rocket")
        page.click("#zero-shot-button")
        expect(page.locator("#zero-shot-label")).to_contain_text(re.compile(r"\b(cat|dog|rocket)\b"))
        expect(page.locator("#zero-shot-chart canvas, #zero-shot-chart svg").first).to_be_visible()
        page.screenshot(path=str(Path(__file__).resolve().parents[1] / "test-artifacts" / "space-pushed.png"),
                        full_page=True)
        browser.close()
