"""Task discovery: shipped and user task folders, offline registry tasks, clear errors."""
from __future__ import annotations

import json
import sys

import pytest

from torchchat.errors import DownloadError, MissingDependencyError, UserInputError

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from torchchat.evaluation.tasks import load_tasks, require_lm_eval  # noqa: E402


def _docs(task) -> list[dict]:
    return list(task.test_docs())


def test_shipped_tasks_load_offline_with_their_data():
    (cloze,) = load_tasks(["storybook_cloze"]).objects
    docs = _docs(cloze)
    assert len(docs) == 32 and set(docs[0]) == {"context", "choices", "answer"}
    tagged = load_tasks(["storybook"]).objects
    assert sorted(t.task_name for t in tagged) == ["storybook_cloze", "storybook_gen", "storybook_ppl"]
    ppl = next(t for t in tagged if t.task_name == "storybook_ppl")
    assert ppl.OUTPUT_TYPE == "loglikelihood_rolling" and len(_docs(ppl)) == 36


def _user_task(folder, name: str, rows: list[dict], data_path: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_path or data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{c}}"\n'
        "doc_to_target: a\n"
        "metric_list:\n  - metric: acc\n"
    )


def test_a_tasks_dir_adds_tasks_and_overrides_shipped_ones(tmp_path):
    rows = [{"q": "The sky is", "c": ["blue", "loud"], "a": 0}, {"q": "Fire is", "c": ["cold", "hot"], "a": 1}]
    _user_task(tmp_path / "mine", "my_quiz", rows)
    _user_task(tmp_path / "mine", "storybook_cloze", rows[:1])
    objects = load_tasks(["my_quiz", "storybook_cloze"], [tmp_path / "mine"]).objects
    assert [len(_docs(t)) for t in objects] == [2, 1]


def test_a_missing_data_file_is_a_clear_input_error(tmp_path):
    _user_task(tmp_path, "broken_quiz", [{"q": "x", "c": ["a", "b"], "a": 0}], data_path="no_such_file.jsonl")
    with pytest.raises(UserInputError, match="data file not found.*working directory"):
        load_tasks(["broken_quiz"], [tmp_path])


def test_a_tasks_dir_that_is_not_a_folder_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="not a folder"):
        load_tasks(["storybook"], [tmp_path / "nope"])


def test_wikitext_offline_fails_with_a_clear_message():
    """conftest sets HF_DATASETS_OFFLINE=1: the registry's default task cannot fetch its data."""
    with pytest.raises(DownloadError, match="task 'wikitext' needs its dataset.*HF_DATASETS_OFFLINE.*storybook"):
        load_tasks(["wikitext"])


def test_an_unreachable_hub_fails_before_any_download_retry(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(DownloadError, match="hub.invalid, which cannot be reached.*HF_DATASETS_OFFLINE=1"):
        load_tasks(["wikitext"])


def test_no_lm_eval_names_the_install_step(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[eval\]'.*lm-eval==0\.4\.13"):
        require_lm_eval()
