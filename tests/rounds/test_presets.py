"""Presets: the best measured setting by default where members are calibrated, the
paper's method by name, every option still overriding."""

import json
from pathlib import Path

import pytest

from specem_fast import Ensemble, GenerationSettings
from specem_fast.cli import main
from specem_fast.config import PRESETS
from specem_fast.errors import SpecEMError
from specem_fast.hub.registry import DEFAULT_MODELS
from specem_fast.rounds.weights import shipped_weights

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "List three colours."


@pytest.fixture(scope="module")
def names(tiny_dirs):
    return [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]


@pytest.fixture()
def tiny(names):
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    yield ens
    ens.close()


def test_uncalibrated_members_default_to_the_reference_method(tiny):
    assert tiny.preset == "reference" and tiny.defaults == GenerationSettings()
    res = tiny.generate(PROMPT, max_new_tokens=8, window=4)
    assert res.settings["init_weights"] == "uniform" and res.settings["exit_threshold"] is None
    assert res.metadata["preset"] == "reference" and res.metadata["weights"] is None
    with pytest.raises(SpecEMError, match="preset 'recommended' starts from prior weights"):
        tiny.use_preset("recommended")
    with pytest.raises(SpecEMError, match="preset must be one of auto, reference, recommended"):
        tiny.use_preset("best")


def test_prior_weights_make_auto_the_recommended_setting_and_options_override(names, tmp_path):
    book = {"format": "specem-fast-weights/1", "verifiers": names, "prior": {names[0]: 0.2, names[1]: 0.8},
            "learned": None, "requests": 0}
    path = tmp_path / "w.json"
    path.write_text(json.dumps(book))
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2, weights=str(path))
    try:
        assert ens.preset == "recommended"
        assert ens.defaults == GenerationSettings(**PRESETS["recommended"])
        res = ens.generate(PROMPT, max_new_tokens=12, window=4)
        assert res.settings["init_weights"] == "prior" and res.settings["exit_threshold"] == 0.2
        assert res.settings["skip_agreed"] is True and res.settings["exit_patience"] == 2
        assert res.rounds[0].weights == pytest.approx({names[0]: 0.2, names[1]: 0.8}, abs=0.05)
        assert res.metadata["preset"] == "recommended" and res.metadata["weights"] == str(path)
        over = ens.generate(PROMPT, max_new_tokens=12, window=4, skip_agreed=False, exit_threshold=None)
        assert over.settings["skip_agreed"] is False and over.settings["exit_threshold"] is None
        assert over.settings["init_weights"] == "prior"  # the rest of the preset stays
        # an explicit GenerationSettings is taken as it is
        ref = ens.generate(PROMPT, settings=GenerationSettings.preset("reference", max_new_tokens=12, window=4))
        assert ref.settings["init_weights"] == "uniform"
        ens.use_preset("reference")
        assert ens.generate(PROMPT, max_new_tokens=12, window=4).text == ref.text
    finally:
        ens.close()


def test_the_shipped_calibration_is_the_measured_one_for_the_default_members():
    defaults = [m.name for m in DEFAULT_MODELS]
    path = shipped_weights(defaults)
    assert path is not None and path.parent.name == "data"
    shipped = json.loads(path.read_text())
    measured = json.loads((ROOT / "benchmarks/eval/weights-gsm8k-dev.json").read_text())
    assert shipped["prior"] == measured["prior"] and shipped["calibration"]["accuracy"] == \
        measured["calibration"]["accuracy"]
    assert "items 300-399" in shipped["calibration"]["made_by"]
    assert shipped_weights(list(reversed(defaults))) == path  # the same members in another order
    assert shipped_weights(defaults[:2]) is None and shipped_weights(["x", "y", "z"]) is None


def test_cli_preset_checks(names, capsys):
    code = main(["generate", "--models", ",".join(names), "--preset", "recommended", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "--preset recommended starts from prior weights" in err
    code = main(["generate", "--models", ",".join(names), "--preset", "reference", "--prompt", PROMPT,
                 "--max-new-tokens", "6", "--window", "3", "--cache-tokens", "512", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["metadata"]["preset"] == "reference"


def test_profiles_share_the_members_with_their_own_weights_and_defaults(names, tmp_path):
    book = {"format": "specem-fast-weights/1", "verifiers": names, "prior": {names[0]: 0.9, names[1]: 0.1},
            "learned": None, "requests": 0}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(book))
    ens = Ensemble.from_pretrained(names, cache_tokens=512, max_batch=2)
    try:
        prof = ens.add_profile("task", weights=str(path))
        assert prof.preset == "recommended" and ens.preset == "reference"
        res = ens.generate(PROMPT, max_new_tokens=10, window=4, profile="task")
        assert res.metadata["profile"] == "task" and res.metadata["weights"] == str(path)
        assert res.settings["init_weights"] == "prior"
        assert res.rounds[0].weights[names[0]] > 0.8
        plain = ens.generate(PROMPT, max_new_tokens=10, window=4)
        assert plain.metadata["profile"] == "default" and plain.settings["init_weights"] == "uniform"
        with pytest.raises(SpecEMError, match="no profile 'nope' in this ensemble"):
            ens.generate(PROMPT, profile="nope")
        with pytest.raises(SpecEMError, match="empty or taken"):
            ens.add_profile("task")
        # learned weights feed the profile's own book, not the default one
        ens.generate(PROMPT, max_new_tokens=10, window=4, profile="task", init_weights="learned", skip_agreed=False,
                     exit_threshold=None)
        assert ens.weights.requests == 0
        seg = list(ens.stream(PROMPT, max_new_tokens=6, window=3, profile="task"))
        assert "".join(s.text for s in seg)
    finally:
        ens.close()
