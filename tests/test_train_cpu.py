"""The real trainer on CPU, launched as a user launches it: ./run_train.sh (torchrun)."""

from __future__ import annotations

import re
import shutil

import pytest

from conftest import losses_by_step, require_prepared_assets, run_trainer

pytestmark = pytest.mark.slow

GC_AFTER_FIRST_STEP = "[GC] Collecting the first step's compile garbage"  # NeoLLMTrainer's log line


@pytest.fixture(autouse=True)
def _assets():
    require_prepared_assets()


GRAD_NORM = re.compile(r"(?<!validate )step:\s*(\d+)\s+loss:\s*\S+\s+grad_norm:\s*(\S+)")


def losses_and_norms(output: str) -> tuple[dict[int, float], dict[int, float]]:
    """A run's training losses and gradient norms by step."""
    return losses_by_step(output), {int(s): float(g) for s, g in GRAD_NORM.findall(output)}


def _assert_same_steps(runs: dict, a: str, b: str) -> None:
    """Runs ``a`` and ``b`` (losses_and_norms) took the same 3 steps: norms within 1e-4, losses 1e-5."""
    (a_losses, a_norms), (b_losses, b_norms) = runs[a], runs[b]
    assert sorted(a_losses) == [1, 2, 3] and sorted(a_norms) == [1, 2, 3]
    for step in (1, 2, 3):
        assert a_norms[step] == pytest.approx(b_norms[step], rel=1e-4), (step, runs)
        assert a_losses[step] == pytest.approx(b_losses[step], rel=1e-5, abs=1e-5), (step, runs)


def _train(dump, steps: int, interval: int, ngpu: int = 1, *extra: str):
    result = run_trainer(
        "--training.steps", str(steps), "--checkpoint.interval", str(interval),
        "--job.dump_folder", str(dump), *extra, ngpu=ngpu,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _check_resume(dump, steps: int, interval: int, ngpu: int) -> dict[int, float]:
    """Train, drop the last checkpoint, train again: the resumed steps must repeat exactly."""
    output = _train(dump, steps, interval, ngpu)
    assert output.count(GC_AFTER_FIRST_STEP) == 1, "one collection after the first step, not more"
    first = losses_by_step(output)
    assert sorted(first) == list(range(1, steps + 1))
    checkpoints = dump / "checkpoint"
    assert (checkpoints / f"step-{interval}" / ".metadata").is_file()
    assert (checkpoints / f"step-{steps}" / ".metadata").is_file()
    shutil.rmtree(checkpoints / f"step-{steps}")

    output = _train(dump, steps, interval, ngpu)
    assert f"Training starts at step {interval + 1}" in output
    assert output.count(GC_AFTER_FIRST_STEP) == 1, "a resumed process collects after its own first step"
    resumed = losses_by_step(output)
    assert sorted(resumed) == list(range(interval + 1, steps + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(first[step], rel=1e-6, abs=1e-6), f"step {step}"
    return first


def test_one_process_trains_saves_and_resumes_exactly(tmp_path):
    losses = _check_resume(tmp_path / "run", steps=12, interval=6, ngpu=1)
    # From ln(151,680) ~ 11.9 the debug model must learn the corpus's unigram statistics fast.
    assert losses[1] > 11.5
    assert max(losses[10], losses[11], losses[12]) < losses[1] - 1.5


def test_two_ranks_fsdp_gloo_train_and_resume_exactly(tmp_path):
    dump = tmp_path / "run2"
    losses = _check_resume(dump, steps=6, interval=3, ngpu=2)
    assert losses[6] < losses[1] - 0.8
    # one shard file per rank: the parameters really are split across the two processes
    assert len(list((dump / "checkpoint" / "step-3").glob("*.distcp"))) == 2


def _error_line(result) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if "error: " in line]
    assert len(lines) == 1, result.stdout[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "overrides, ngpu, fragment",
    [
        (("--model.flavor", "gpt5"), 1, "[model] flavor 'gpt5' is unknown"),
        (("--model.hf_assets_path", "no/such/tokenizer"), 1, "no/such/tokenizer"),
        (("--training.dataset_path", "no/such/corpus"), 1, "no/such/corpus"),
        (("--training.global_batch_size", "7"), 2, "not divisible by the 2 data-parallel ranks"),
        (("--model.vocab_size", "1000"), 1, "[model] vocab_size"),
    ],
)
def test_bad_input_stops_with_one_clear_line(tmp_path, overrides, ngpu, fragment):
    result = run_trainer("--job.dump_folder", str(tmp_path / "bad"), *overrides, ngpu=ngpu, timeout=300)
    assert fragment in _error_line(result)
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_fused_loss_trains_like_the_chunked_one_under_fsdp(tmp_path):
    """[loss] impl = "fused" (gradient formed in the forward pass, the tied head weight owned by the
    root FSDP2 unit) takes the same optimizer steps as the recomputing chunked path on 2 ranks."""
    common = ("--checkpoint.no-enable", "--loss.chunk_size", "96")
    losses = {}
    for impl in ("chunked", "fused"):
        result = run_trainer("--training.steps", "4", "--job.dump_folder", str(tmp_path / impl),
                             "--loss.impl", impl, *common, ngpu=2)
        assert result.returncode == 0, result.stdout[-4000:]
        losses[impl] = losses_by_step(result.stdout)
    assert sorted(losses["fused"]) == [1, 2, 3, 4]
    for step, value in losses["chunked"].items():
        assert abs(losses["fused"][step] - value) < 1e-4 * max(1.0, abs(value)), (step, losses)


def test_one_process_accumulation_by_foreach_add_takes_the_steps_of_one_micro_batch(tmp_path):
    """One process with 4 micro-batches of 1 (gradients by autograd.grad, summed by one foreach add
    each: neollm.train.accumulate_grads) against one micro-batch of 4 (autograd's own backward):
    the same sequences and initial weights, so the same gradient norm at step 1 and the same losses."""
    foreach_line = "added to .grad by one foreach add"
    runs = {}
    for local in ("1", "4"):
        result = run_trainer("--training.steps", "3", "--job.dump_folder", str(tmp_path / local),
                             "--checkpoint.no-enable", "--training.global_batch_size", "4",
                             "--training.local_batch_size", local)
        assert result.returncode == 0, result.stdout[-4000:]
        assert (foreach_line in result.stdout) == (local == "1"), local
        runs[local] = losses_and_norms(result.stdout)
    _assert_same_steps(runs, "1", "4")


def test_ddp_with_gradient_accumulation_takes_the_same_steps(tmp_path):
    """DDP (replicate 2, shard 1) sums the replicas' gradients; with two micro-batches per rank the
    gradients are reduced once, after both, so the run equals the one with one micro-batch of two
    (same initial weights and sequences per rank): same gradient norm at step 1, same losses."""
    ddp = ("--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1")
    runs = {}
    for local in ("1", "2"):
        result = run_trainer("--training.steps", "3", "--job.dump_folder", str(tmp_path / local),
                             "--checkpoint.no-enable", "--training.global_batch_size", "4",
                             "--training.local_batch_size", local, *ddp, ngpu=2)
        assert result.returncode == 0, result.stdout[-4000:]
        assert "dp_replicate=2, dp_shard=1" in result.stdout
        assert f"gradient accumulation steps {2 // int(local)}" in result.stdout
        runs[local] = losses_and_norms(result.stdout)
    _assert_same_steps(runs, "1", "2")


@pytest.mark.slow
def test_cuda_graph_mode_zeroes_gradients_in_place_and_trains_the_same(tmp_path):
    """[compile] mode "reduce-overhead" makes the trainer zero gradients in place instead of dropping them
    (neollm.train.zero_grads_in_place: under CUDA graphs a dropped gradient came back as a graph output that
    the next micro-batch's replay overwrote). On the CPU, where inductor makes no CUDA graphs, the run with
    two micro-batches per step must take exactly the steps of the default mode's run."""
    require_prepared_assets()
    common = ("--training.steps", "4", "--checkpoint.no-enable", "--compile.enable", "--compile.scope", "model")
    default = run_trainer("--job.dump_folder", str(tmp_path / "default"), *common)
    graphs = run_trainer("--job.dump_folder", str(tmp_path / "graphs"), *common, "--compile.mode", "reduce-overhead")
    assert default.returncode == 0, default.stdout[-3000:]
    assert graphs.returncode == 0, graphs.stdout[-3000:]
    in_place = "gradients are zeroed in place"
    assert in_place in graphs.stdout and in_place not in default.stdout
    expected, got = losses_by_step(default.stdout), losses_by_step(graphs.stdout)
    assert sorted(expected) == [1, 2, 3, 4]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
