"""One server, several served model ids: each a profile of the same members with its own
weights file (one calibration per task), listed by /v1/models; responses name the preset,
the weights and the profile they ran with."""

import json

import httpx
import openai
import pytest

from specem_fast import Ensemble
from specem_fast.cli import main
from specem_fast.server import BackgroundServer, create_app

CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def names(tiny_dirs):
    return [str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])]


@pytest.fixture(scope="module")
def weights(names, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "task.json"
    path.write_text(json.dumps({"format": "specem-fast-weights/1", "verifiers": names,
                                "prior": {names[0]: 0.9, names[1]: 0.1}, "learned": None, "requests": 0}))
    return str(path)


@pytest.fixture(scope="module")
def served(names, weights):
    ens = Ensemble.from_pretrained(names, cache_tokens=256, max_batch=2)
    task = ens.add_profile("task", weights=weights)
    with BackgroundServer(create_app(ens, model_name="base", profiles={"task": task.defaults})) as srv:
        yield ens, srv
    ens.close()


def test_models_lists_every_profile_and_requests_pick_theirs(served, weights):
    ens, srv = served
    listed = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == ["base", "task"]
    assert listed[0]["preset"] == "reference" and listed[0]["weights"] is None
    assert listed[1]["preset"] == "recommended" and listed[1]["weights"] == weights
    assert httpx.get(srv.url + "/v1/models/task", timeout=30).json()["profile"] == "task"
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    base = client.chat.completions.create(model="base", messages=CHAT, max_tokens=8, extra_body={"window": 4})
    task = client.chat.completions.create(model="task", messages=CHAT, max_tokens=8, extra_body={"window": 4})
    assert base.model == "base" and task.model == "task"
    b, t = base.model_extra["specem"], task.model_extra["specem"]
    assert b["preset"] == "reference" and b["profile"] == "default" and b["settings"]["init_weights"] == "uniform"
    assert t["preset"] == "recommended" and t["profile"] == "task" and t["weights"] == weights
    assert t["settings"]["init_weights"] == "prior" and t["settings"]["skip_agreed"] is True
    with pytest.raises(openai.NotFoundError, match="'base', 'task'"):
        client.chat.completions.create(model="other", messages=CHAT, max_tokens=4)
    # a request's own fields still override its profile's defaults
    over = client.chat.completions.create(model="task", messages=CHAT, max_tokens=8,
                                          extra_body={"window": 4, "skip_agreed": False})
    assert over.model_extra["specem"]["settings"]["skip_agreed"] is False
    whole = client.chat.completions.create(model="base", messages=CHAT, max_tokens=6,
                                           extra_body={"window": 6, "prefer_finished": True})
    assert whole.model_extra["specem"]["settings"]["prefer_finished"] is True
    with pytest.raises(openai.BadRequestError, match="prefer_finished"):
        client.chat.completions.create(model="base", messages=CHAT, max_tokens=4, extra_body={"prefer_finished": "yes"})
    assert ens.cache.free_slots == ens.config.max_batch


def test_serve_profile_arguments_are_checked_before_models_load(names, capsys, tmp_path):
    for spec, message in (("task", "is not NAME=WEIGHTS"), ("x=" + str(tmp_path / "none.json"), "none.json"),
                          ("specem-fast=w.json", "names a served model twice")):
        code = main(["serve", "--models", ",".join(names), "--profile", spec, "--port", "0"])
        assert code == 2 and message in capsys.readouterr().err
