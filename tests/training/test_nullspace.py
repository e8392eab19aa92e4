"""TrainConfig.privacy_nullspace: the probes equal scikit-learn's, the projection removes what a linear probe reads
(and only that), and the trainer folds it into the reconstruction head once, resumably."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stpcore.testing import RandomClipLoader
from stpcore.training import TrainConfig, Trainer
from stpcore.training.nullspace import logistic_probe, privacy_nullspace


def _planted(n: int = 2000, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attribute 0 along axis 0, attribute 1 along axis 1 (against the sign), the other axes noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n, 2), generator=g).double()
    features = torch.randn(n, dim, generator=g, dtype=torch.float64)
    features[:, 0] += 3.0 * labels[:, 0]
    features[:, 1] -= 3.0 * labels[:, 1]
    return features, labels


@pytest.mark.parametrize("separation", [0.5, 8.0], ids=["overlapping", "nearly-separable"])
def test_the_probe_is_scikit_learns_logistic_regression(separation):
    """The same minimiser as LogisticRegression(C=1) (lbfgs, tight tolerance), an implementation nobody here wrote,
    on features of very different scales."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 12, generator=g, dtype=torch.float64)
    x[:, 4] *= 20.0
    y = (separation * (x[:, 0] - 0.5 * x[:, 2]) + torch.randn(3000, generator=g, dtype=torch.float64) > 0.4).double()
    w, b, converged = logistic_probe(x, y)
    assert converged
    ref = sklearn.LogisticRegression(C=1.0, max_iter=10000, tol=1e-12).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(w.numpy(), ref.coef_[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(b), ref.intercept_[0], rtol=1e-5, atol=1e-6)


def test_separable_rows_give_a_finite_probe_that_separates_them():
    """Without the L2 term separable rows would send w to infinity; with it the minimum is finite."""
    x = torch.randn(200, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).double()
    w, b, converged = logistic_probe(x, y)
    assert converged and torch.isfinite(w).all() and torch.isfinite(b)
    assert ((x @ w + b > 0).double() == y).double().mean() > 0.95  # the penalty may give up a row at the margin


def test_float32_features_in_chunks_give_the_float64_probe(monkeypatch):
    """The trainer keeps its features in float32 and sums over chunks of rows: the same probe as all rows in
    float64 at once."""
    import stpcore.training.nullspace as nullspace

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 5, generator=g)
    y = (x[:, 1] + 0.3 * torch.randn(1000, generator=g) > 0).float()
    whole = logistic_probe(x.double(), y.double())
    monkeypatch.setattr(nullspace, "CHUNK_ROWS", 97)
    chunked = logistic_probe(x, y)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-9, rtol=0)


def test_the_nullspace_removes_each_attributes_direction_and_nothing_else():
    features, labels = _planted()
    projected = features.clone()
    projection, accuracies, unconverged = privacy_nullspace(projected, labels, rounds=1)
    assert accuracies[0][0] > 0.9 and accuracies[0][1] > 0.9 and unconverged == 0  # read before removal
    torch.testing.assert_close(projected, features @ projection)  # the rows were projected in place, as x P
    for a in range(2):  # a fresh probe is near chance afterwards
        w, b, _ = logistic_probe(projected, labels[:, a])
        assert ((projected @ w + b > 0).double() == labels[:, a]).double().mean() < 0.6
    assert torch.linalg.matrix_rank(projection, atol=1e-8) == 4  # two directions went
    torch.testing.assert_close(projection[2:, 2:], torch.eye(4, dtype=torch.float64), atol=0.1, rtol=0)
    torch.testing.assert_close(projection, projection.T)  # an orthogonal projection: symmetric, idempotent
    torch.testing.assert_close(projection @ projection, projection)


def test_float32_rows_still_give_an_exact_orthogonal_projection():
    """The rows are projected in place in float32; the rounding left along removed directions must not tilt later
    probes into them (it did, by up to ~1e-3, before each direction was orthogonalised against the earlier ones)."""
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 2, (3000, 3), generator=g).double()
    directions = torch.randn(3, 12, generator=g, dtype=torch.float64)
    features = torch.randn(3000, 12, generator=g) + 1.5 * (labels @ directions).float()
    projection, _, _ = privacy_nullspace(features, labels, rounds=3)
    torch.testing.assert_close(projection, projection.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(projection @ projection, projection, atol=1e-12, rtol=0)
    values = torch.linalg.eigvalsh(projection)
    assert (values.abs() < 1e-12).sum() == 9 and ((values - 1).abs() < 1e-12).sum() == 3  # 3 rounds x 3 attributes


def test_the_nullspace_equals_the_benchmarks_scikit_learn_version():
    """benchmarks/decoder_nullspace.py made the committed results with scikit-learn; the trainer's torch version
    gives the same projection, up to scikit-learn's default stopping tolerance (1e-4, which that script keeps; the
    probes themselves agree to 1e-5 at a tight tolerance, above)."""
    pytest.importorskip("sklearn")
    from benchmarks.decoder_nullspace import nullspace

    features, labels = _planted(n=1500, dim=8, seed=5)
    ours, our_acc, _ = privacy_nullspace(features.clone(), labels, rounds=2)
    theirs, their_acc = nullspace(features.numpy(), labels.numpy(), rounds=2)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-2)
    np.testing.assert_allclose(np.array(our_acc, dtype=float), np.array(their_acc, dtype=float), atol=2e-3)


def test_an_attribute_with_one_class_trains_no_probe():
    features, labels = _planted(n=300, dim=4, seed=1)
    labels[:, 0] = 0.0
    projection, accuracies, _ = privacy_nullspace(features, labels, rounds=2)
    assert [row[0] for row in accuracies] == [None, None]
    assert torch.linalg.matrix_rank(projection, atol=1e-8) == 2  # two rounds of attribute 1 only


def _cfg(tmp_path, **kw):
    base = dict(data_root="unused", out_dir=str(tmp_path / "run"), preset="tiny", batch_size=4, phase1_epochs=1,
                phase2_epochs=1, progress=False, checkpoint_every=0, base_lr=0.2, warmup_epochs=0.5,
                deterministic=True)
    return TrainConfig(**(base | kw))


def _loader():
    return RandomClipLoader(num_batches=3, batch_size=4, num_frames=8, size=32)


def _events(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == "privacy nullspace projected"]


def test_the_trainer_projects_the_reconstruction_head_only(tmp_path):
    plain = Trainer(_cfg(tmp_path / "plain"), _loader())
    plain.fit()
    projected = Trainer(_cfg(tmp_path / "projected", privacy_nullspace=2, candidate_every=1), _loader())
    projected.fit()
    before, after = plain.anonymizer.state_dict(), projected.anonymizer.state_dict()
    for name, value in after.items():
        assert torch.equal(value, before[name]) != (name == "head_recon.weight"), name
    # The new weight is W P, P an orthogonal projection of rank D - 10 (2 rounds x 5 attributes).
    dim = projected.anonymizer.cfg.embed_dim
    w, new = before["head_recon.weight"].double(), after["head_recon.weight"].double()  # (pixels, D)
    p = torch.linalg.lstsq(w, new).solution  # (D, D): W has full column rank, so this is the P of W P
    torch.testing.assert_close(w @ p, new, atol=1e-5, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(p, atol=1e-4) == dim - 10
    (event,) = _events(tmp_path / "projected" / "run")
    assert event["rounds"] == 2 and event["clips"] == 2 * 12 and event["tokens"] > 0  # two passes of 12 clips
    assert event["seconds"] > 0
    assert len(event["probe_accuracy"]) == 2 and all(len(row) == 5 for row in event["probe_accuracy"])
    # The exported model (what anonymize and the evaluation load) is the projected one.
    from stpcore.models import load_anonymizer

    exported = load_anonymizer(tmp_path / "projected" / "run" / "stprivacy.pt")
    assert torch.equal(exported.head_recon.weight, after["head_recon.weight"])
    # Phase-2 candidates are the models as trained, taken before the projection (as documented).
    candidate = load_anonymizer(tmp_path / "projected" / "run" / "candidates" / "phase2-epoch001.pt")
    assert torch.equal(candidate.head_recon.weight, before["head_recon.weight"])


def test_a_run_killed_during_the_projection_redoes_it_on_resume(tmp_path, monkeypatch):
    full = Trainer(_cfg(tmp_path / "a", privacy_nullspace=1), _loader())
    full.fit()
    import stpcore.training.trainer as trainer_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "project_privacy_out", killed)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_cfg(tmp_path / "b", privacy_nullspace=1), _loader()).fit()
    assert not (tmp_path / "b" / "run" / "stprivacy.pt").exists()
    monkeypatch.undo()
    resumed = Trainer(_cfg(tmp_path / "b", privacy_nullspace=1), _loader())
    resumed.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert torch.equal(resumed.anonymizer.head_recon.weight, full.anonymizer.head_recon.weight)
    assert len(_events(tmp_path / "b" / "run")) == 1
    # A finished run resumed again does not project a second time.
    again = Trainer(_cfg(tmp_path / "b", privacy_nullspace=1), _loader())
    again.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert torch.equal(again.anonymizer.head_recon.weight, full.anonymizer.head_recon.weight)
    assert len(_events(tmp_path / "b" / "run")) == 1


def test_a_signal_during_the_projection_passes_stops_the_run_and_the_resume_redoes_them(tmp_path):
    """SIGTERM while the probes' passes read the data (phase 1 and 2: 6 batches, the passes 6 more): the run stops
    with a checkpoint from before them (it finished, exit 0, "trained", the signal lost), and the resume projects
    as an uninterrupted run does."""
    from stpcore.testing import StopAfter
    from stpcore.training import TrainingInterrupted

    full = Trainer(_cfg(tmp_path / "a", privacy_nullspace=1), _loader())
    full.fit()
    wrapped = StopAfter(_loader(), 8)
    first = Trainer(_cfg(tmp_path / "b", privacy_nullspace=1), wrapped)
    wrapped.trainer = first
    with pytest.raises(TrainingInterrupted, match="during the privacy-nullspace passes: checkpoint written"):
        first.fit()
    assert wrapped.seen == 8 and not (tmp_path / "b" / "run" / "stprivacy.pt").exists()
    assert _events(tmp_path / "b" / "run") == []
    resumed = Trainer(_cfg(tmp_path / "b", privacy_nullspace=1), _loader())
    resumed.fit(resume=tmp_path / "b" / "run" / "last.pt")
    assert torch.equal(resumed.anonymizer.head_recon.weight, full.anonymizer.head_recon.weight)
    assert len(_events(tmp_path / "b" / "run")) == 1


def test_a_finished_run_is_not_resumed_with_another_nullspace_setting(tmp_path):
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    other = Trainer(_cfg(tmp_path, phase2_epochs=0, privacy_nullspace=3), _loader())
    with pytest.raises(ValueError, match="privacy_nullspace=0 \\(now 3\\).*start a new run"):
        other.fit(resume=tmp_path / "run" / "last.pt")


class _Unlabelled(RandomClipLoader):
    def __iter__(self):
        for batch in super().__iter__():
            batch.has_privacy[:] = False
            yield batch


def test_without_privacy_labels_it_warns_and_keeps_the_head(tmp_path):
    trainer = Trainer(_cfg(tmp_path, phase2_epochs=0, privacy_nullspace=2),
                      _Unlabelled(num_batches=2, batch_size=4, num_frames=8, size=32))
    with pytest.warns(RuntimeWarning, match="no training clip with privacy labels"):
        trainer.fit()
    plain = Trainer(_cfg(tmp_path / "plain", phase2_epochs=0), _Unlabelled(num_batches=2, batch_size=4,
                                                                          num_frames=8, size=32))
    plain.fit()
    assert torch.equal(trainer.anonymizer.head_recon.weight, plain.anonymizer.head_recon.weight)


def test_negative_rounds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="privacy_nullspace must be >= 0"):
        _cfg(tmp_path, privacy_nullspace=-1)


def test_rounds_that_would_remove_every_direction_are_refused_before_training(tmp_path):
    """The tiny preset has D = 48: 9 rounds remove 45 directions, 10 would remove 50."""
    Trainer(_cfg(tmp_path / "nine", privacy_nullspace=9), _loader())
    with pytest.raises(ValueError, match="privacy_nullspace=10 would remove 50 of the reconstruction head's 48 .*at "
                                         "most 9 rounds"):
        Trainer(_cfg(tmp_path / "ten", privacy_nullspace=10), _loader())


def test_a_run_finished_before_the_option_existed_is_not_resumed_with_it(tmp_path):
    """A checkpoint saved before privacy_nullspace existed has no such key: it was made without the projection."""
    Trainer(_cfg(tmp_path, phase2_epochs=0), _loader()).fit()
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["config"]["privacy_nullspace"]
    torch.save(state, last)
    with pytest.raises(ValueError, match="made with privacy_nullspace=0 \\(now 2\\)"):
        Trainer(_cfg(tmp_path, phase2_epochs=0, privacy_nullspace=2), _loader()).fit(resume=last)


class _MixedLabels(RandomClipLoader):
    """Every other video without privacy labels; each labelled video's attributes its own pattern."""

    def __iter__(self):
        for batch in super().__iter__():
            batch.has_privacy[1::2] = False
            batch.privacy[:] = torch.tensor([[i % 2, (i // 2) % 2, 1, 0, i % 3 == 0] for i in
                                             batch.video_index.tolist()], dtype=torch.float32)
            yield batch


def test_the_probes_read_the_heads_input_of_labelled_videos_with_their_own_labels():
    """Independent of where the hook sits: the head applied to each collected row gives that kept tubelet's pixels
    in the model's output video, and each row carries its own video's attributes; unlabelled videos give no row."""
    from stpcore.models import STPrivacy, STPrivacyConfig
    from stpcore.training.nullspace import collect_decoder_inputs
    from stpcore.tubelets import to_tubelets

    torch.manual_seed(0)
    model = STPrivacy(STPrivacyConfig.from_name("tiny"))
    loader = _MixedLabels(num_batches=2, batch_size=4, num_frames=8, size=32)
    features, labels, clips = collect_decoder_inputs(model, loader, torch.device("cpu"), "none", passes=2,
                                                     first_epoch=3)
    assert model.training  # left as it was
    model.eval()
    expected_pixels, expected_labels = [], []
    with torch.no_grad():
        for epoch in (3, 4):
            loader.set_epoch(epoch)
            for batch in loader:
                out = model(batch.clips)
                pixels = to_tubelets(out.video, model.cfg.tubelet)  # (B, N, P)
                kept = pixels.gather(1, out.kept_positions[..., None].expand(-1, -1, pixels.shape[-1]))
                for v in range(len(batch.clips)):
                    if batch.has_privacy[v]:
                        expected_pixels.append(kept[v])
                        expected_labels.append(batch.privacy[v].expand(kept.shape[1], -1))
    assert clips == 2 * 2 * 2  # 2 passes x 2 batches x 2 labelled videos
    with torch.no_grad():
        torch.testing.assert_close(model.head_recon(features), torch.cat(expected_pixels), atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, torch.cat(expected_labels))


def test_the_projection_under_bf16_autocast(tmp_path):
    """amp="bf16" (the GPU default): the features come out of autocast and the probes still run in float64, so the
    head is finite and loses exactly the 10 directions."""
    trainer = Trainer(_cfg(tmp_path, amp="bf16", phase2_epochs=0, privacy_nullspace=2), _loader())
    trainer.fit()
    weight = trainer.anonymizer.head_recon.weight
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    assert torch.linalg.matrix_rank(weight.double(), atol=1e-5) == trainer.anonymizer.cfg.embed_dim - 10
    (event,) = _events(tmp_path / "run")
    assert event["unconverged"] == 0 and event["clips"] == 2 * 12
