"""Executes the demo notebooks and stores their outputs: the only way stored outputs are made.

    python notebooks/run_all.py                 # every notebook, full settings, in place
    python notebooks/run_all.py 04 05           # the notebooks whose names start with 04 or 05
    python notebooks/run_all.py --fast --output /tmp/nb   # small settings, into copies

Each notebook runs in a fresh kernel whose working directory is a temporary folder (files a
notebook writes, such as TensorBoard logs, never land in the repository), with this checkout on
`PYTHONPATH` (so keras_safe need not be installed) and `KERAS_SAFE_HEADLESS=1` (no TensorBoard
server is started). `--fast` sets `KERAS_SAFE_FAST=1`, the small settings the test suite uses.
A notebook is written only when every cell ran without an error. After a run in place, the
README's figures are checked against the new outputs (`tools/readme_figures.py`): the figures
that changed are listed, to be updated in the README.
"""

import argparse
import importlib.util
import os
import pathlib
import sys
import tempfile
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
TIMEOUT = 1800  # seconds per cell


def kernel_environment(fast):
    """The environment of the notebook kernel: full or small settings, headless."""
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # figures go through the inline backend into the outputs
    env.pop("KERAS_SAFE_FAST", None)
    if fast:
        env["KERAS_SAFE_FAST"] = "1"
    env["KERAS_SAFE_HEADLESS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["KERAS_BACKEND"] = "tensorflow"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def execute_notebook(path, fast=False, output=None, timeout=TIMEOUT):
    """Runs the notebook at `path` top to bottom and writes it with its outputs.

    Args:
        path: the notebook.
        fast: the small settings of the test suite (`KERAS_SAFE_FAST=1`).
        output: where to write the executed notebook; None: in place.
        timeout: seconds allowed per cell.

    Returns:
        `(notebook, seconds)`: the executed notebook and the wall time of the run.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (nothing is written).
    """
    path = pathlib.Path(path)
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keras_safe_nb_") as workdir:
        client = nbclient.NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            coalesce_streams=True,
            # TensorFlow's C++ start-up lines go to this process's stderr, not into the outputs.
            extra_arguments=["--IPKernelApp.capture_fd_output=False"],
            resources={"metadata": {"path": workdir}},
        )
        client.execute(env=kernel_environment(fast), cwd=workdir)
    seconds = time.perf_counter() - start
    notebook.metadata.pop("widgets", None)
    nbformat.write(notebook, output if output is not None else path)
    return notebook, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only notebooks starting with these")
    parser.add_argument("--fast", action="store_true", help="small settings (KERAS_SAFE_FAST=1)")
    parser.add_argument("--output", help="folder for the executed copies (default: in place)")
    args = parser.parse_args(argv)
    if args.fast and not args.output:
        parser.error("--fast needs --output: the stored notebooks keep their full-settings run")
    chosen = [p for p in NOTEBOOKS if not args.names or p.name.startswith(tuple(args.names))]
    if not chosen:
        parser.error(f"no notebook matches {args.names}; notebooks: {[p.name for p in NOTEBOOKS]}")
    if args.output:
        pathlib.Path(args.output).mkdir(parents=True, exist_ok=True)
    total = 0.0
    for path in chosen:
        output = pathlib.Path(args.output) / path.name if args.output else None
        print(f"{path.name}: running ({'fast' if args.fast else 'full'} settings)", flush=True)
        _, seconds = execute_notebook(path, fast=args.fast, output=output)
        total += seconds
        size = (output or path).stat().st_size
        print(f"{path.name}: {seconds:.0f} s, {size / 1024:.0f} KiB", flush=True)
    print(f"{len(chosen)} notebooks in {total:.0f} s")
    if not args.output:
        report_readme_figures()
    return 0


def report_readme_figures():
    """Lists the README figures that no longer agree with their sources (the new outputs)."""
    spec = importlib.util.spec_from_file_location(
        "readme_figures", ROOT / "tools" / "readme_figures.py"
    )
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    _, problems = figures.check(ROOT)
    for problem in problems:
        print(f"README figure to update: {problem}")
    if not problems:
        print("README figures agree with the stored outputs")
    return problems


if __name__ == "__main__":
    sys.exit(main())
