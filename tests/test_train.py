"""qaclims.train: the poly schedule and the reference SGD against poly_lr.npz; checkpoint and resume."""
import io
import math

import numpy as np
import pytest
import torch

from qaclims.train import PolyFactor, cam_optimizer, poly_lr, poly_sgd
from refdata import case_names, load_reference

RTOL = 1e-12


def cases():
    data = load_reference("poly_lr.npz")
    names = case_names(data, "case")
    assert names
    return [(name, {key.split("/", 1)[1]: value for key, value in data.items() if key.startswith(name + "/")})
            for name in names]


def settings_of(c):
    return (float(c["base_lr"]), [float(m) for m in c["group_lr_multipliers"]], int(c["max_step"]),
            float(c["power"]), float(c["weight_decay_arg"]))


def group_of_each_param(c):
    """The group of every parameter, read off the first update: torch SGD's first step with momentum is
    p1 = p0 - lr_g * (grad + wd_g * p0) (the buffer starts as the gradient); params are laid out group by group."""
    p0, g0, p1 = c["params_init"], c["grads"][0], c["params_after_step"][0]
    lrs, wds = c["lr_used_at_step"][0], c["weight_decay_per_group"]
    groups, previous = [], 0
    for i in range(len(p0)):
        fits = [g for g in range(previous, len(lrs))
                if math.isclose(p0[i] - lrs[g] * (g0[i] + wds[g] * p0[i]), p1[i], rel_tol=1e-12)]
        assert fits, f"parameter {i} fits no group after group {previous}"
        previous = fits[0]  # several fits only when groups update alike: any consistent choice works
        groups.append(previous)
    return groups


def build(c, momentum=None):
    """Parameters (one float64 tensor per group) and the optimiser the reference call builds."""
    base_lr, mults, max_step, power, wd_arg = settings_of(c)
    layout = np.array(group_of_each_param(c))
    params = [torch.nn.Parameter(torch.from_numpy(c["params_init"][layout == g].copy())) for g in range(len(mults))]
    groups = [{"params": [p], "lr": base_lr * m, "weight_decay": float(wd)}
              for p, m, wd in zip(params, mults, c["weight_decay_per_group"])]
    optimizer, scheduler = poly_sgd(groups, base_lr, wd_arg, max_step, power, momentum=momentum)
    return params, layout, optimizer, scheduler


def run_steps(c, params, layout, optimizer, scheduler, steps):
    """Apply the stored gradients of `steps`; return the lr of each group before each step and the params after."""
    lrs, after = [], []
    for s in steps:
        for g, p in enumerate(params):
            p.grad = torch.from_numpy(c["grads"][s][layout == g].copy())
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
        after.append(torch.cat([p.detach() for p in params]).numpy().copy())
    return np.array(lrs), np.array(after)


def test_probe_lr():
    for name, c in cases():
        base_lr, mults, max_step, power, _ = settings_of(c)
        got = [[poly_lr(base_lr * m, int(s), max_step, power) for m in mults] for s in c["probe_steps"]]
        np.testing.assert_allclose(got, c["probe_lr"], rtol=RTOL, atol=0, err_msg=name)


def test_lr_used_at_every_step():
    for name, c in cases():
        base_lr, mults, max_step, power, _ = settings_of(c)
        closed_form = [[poly_lr(base_lr * m, s, max_step, power) for m in mults] for s in range(len(c["lr_used_at_step"]))]
        np.testing.assert_allclose(closed_form, c["lr_used_at_step"], rtol=RTOL, atol=0, err_msg=name)
        params, layout, optimizer, scheduler = build(c)
        np.testing.assert_allclose([g["lr"] for g in optimizer.param_groups], c["lr_before_first_step"], rtol=RTOL, atol=0)
        lrs, _ = run_steps(c, params, layout, optimizer, scheduler, range(len(c["grads"])))
        np.testing.assert_allclose(lrs, c["lr_used_at_step"], rtol=RTOL, atol=0, err_msg=name)


def test_group_settings_reproduce_the_quirk():
    for name, c in cases():
        _, _, _, power, wd_arg = settings_of(c)
        _, _, optimizer, scheduler = build(c)
        groups = optimizer.param_groups
        assert [g["momentum"] for g in groups] == c["momentum_per_group"].tolist() == [wd_arg] * len(groups), name
        assert [g["weight_decay"] for g in groups] == c["weight_decay_per_group"].tolist(), name
        assert [g["dampening"] for g in groups] == c["dampening_per_group"].tolist(), name
        assert [g["nesterov"] for g in groups] == c["nesterov_per_group"].tolist(), name
        assert scheduler.lr_lambdas[0].power == float(c["poly_power_attr"]) == power


def test_sgd_trajectory():
    for name, c in cases():
        params, layout, optimizer, scheduler = build(c)
        _, after = run_steps(c, params, layout, optimizer, scheduler, range(len(c["grads"])))
        np.testing.assert_allclose(after, c["params_after_step"], rtol=RTOL, atol=0, err_msg=name)


def test_cam_optimizer_matches_reference_call():
    """The two-group builder gives the same trajectory when the reference used [1, x] multipliers."""
    for name, c in cases():
        base_lr, mults, max_step, power, wd_arg = settings_of(c)
        wds = c["weight_decay_per_group"].tolist()
        if len(mults) != 2 or mults[0] != 1.0 or wds != [wd_arg, wd_arg]:
            continue
        _, layout, _, _ = build(c)
        backbone = torch.nn.Parameter(torch.from_numpy(c["params_init"][layout == 0].copy()))
        head = torch.nn.Parameter(torch.from_numpy(c["params_init"][layout == 1].copy()))
        optimizer, scheduler = cam_optimizer([backbone], [head], base_lr, wd_arg, max_step,
                                             head_lr_mult=mults[1], power=power)
        _, after = run_steps(c, [backbone, head], layout, optimizer, scheduler, range(len(c["grads"])))
        np.testing.assert_allclose(after, c["params_after_step"], rtol=RTOL, atol=0, err_msg=name)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_resume_from_checkpoint_mid_way(momentum):
    for name, c in cases():
        n_steps = len(c["grads"])
        params, layout, optimizer, scheduler = build(c, momentum)
        lrs_all, after_all = run_steps(c, params, layout, optimizer, scheduler, range(n_steps))

        for cut in sorted({1, n_steps // 2, int(c["max_step"]) - 1, n_steps - 1} - {0}):
            params, layout, optimizer, scheduler = build(c, momentum)
            run_steps(c, params, layout, optimizer, scheduler, range(cut))
            buffer = io.BytesIO()
            torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)

            # a fresh process: new parameters (at their initial values), optimiser and scheduler, then load
            params, layout, optimizer, scheduler = build(c, momentum)
            with torch.no_grad():
                for p, saved in zip(params, checkpoint["params"]):
                    p.copy_(saved)
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            lrs, after = run_steps(c, params, layout, optimizer, scheduler, range(cut, n_steps))
            np.testing.assert_array_equal(lrs, lrs_all[cut:], err_msg=f"{name} resumed at {cut}")
            np.testing.assert_array_equal(after, after_all[cut:], err_msg=f"{name} resumed at {cut}")


def test_real_momentum_option():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    optimizer, _ = cam_optimizer([p], [q], 0.1, 1e-4, 10, momentum=0.9)
    assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 1e-4]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1 * 10.0]
    # without per-group weight decay: the reference gives none, the fixed optimiser the default
    quirk, _ = poly_sgd([p], 0.1, 1e-4, 10)
    fixed, _ = poly_sgd([p], 0.1, 1e-4, 10, momentum=0.0)
    assert quirk.param_groups[0]["weight_decay"] == 0 and fixed.param_groups[0]["weight_decay"] == 1e-4


def test_schedule_edge_cases():
    assert poly_lr(0.1, 0, 5) == 0.1
    last = poly_lr(0.1, 4, 5)
    assert last > 0 and poly_lr(0.1, 5, 5) == poly_lr(0.1, 1000, 5) == last
    assert PolyFactor(5, 0.0)(3) == 1.0
    rates = [poly_lr(1.0, s, 50) for s in range(60)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert poly_lr(1.0, np.int64(3), np.int64(10)) == poly_lr(1.0, 3, 10)
    for bad in (dict(step=-1), dict(step=2.0), dict(max_step=0), dict(power=-1.0), dict(base_lr=-0.1)):
        kwargs = dict(base_lr=0.1, step=1, max_step=10, power=0.9) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            poly_lr(**kwargs)
    with pytest.raises(ValueError, match="momentum"):
        poly_sgd([torch.nn.Parameter(torch.zeros(1))], 0.1, 1e-4, 10, momentum=1.0)
