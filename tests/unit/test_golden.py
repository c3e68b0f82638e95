"""Today's reward and loss, bit for bit: the outputs tests/unit/golden/make_golden.py saved before the motion levers,
compared with `torch.equal` against the code as it is, every lever at its default (off)."""

import pytest
import torch

from tests.unit.golden import make_golden

GOLDEN = make_golden.HERE


@pytest.fixture(scope="module")
def now() -> dict[str, dict[str, torch.Tensor]]:
    return make_golden.outputs()


@pytest.mark.parametrize("name", sorted(make_golden.FILES))
def test_outputs_equal_the_goldens_exactly(name, now):
    saved = torch.load(GOLDEN / make_golden.FILES[name])
    assert sorted(now[name]) == sorted(saved), f"{name}: other output keys than the golden's"
    for key, value in saved.items():
        assert now[name][key].dtype == value.dtype, f"{name}/{key}: dtype {now[name][key].dtype} vs {value.dtype}"
        assert torch.equal(now[name][key], value), f"{name}/{key} differs from the golden"


def test_goldens_are_not_trivial():
    """The saved rewards spread over several levels and the loss has a gradient: a golden of zeros pins nothing."""
    reward = torch.load(GOLDEN / make_golden.FILES["flow_reward"])
    assert len(set(reward["reward"].tolist())) >= 3
    loss = torch.load(GOLDEN / make_golden.FILES["nft_loss"])
    assert loss["grad_v_theta"].abs().sum() > 0
