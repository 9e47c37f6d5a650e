"""``radfed demo``: the main job on one machine.

Today it runs the stages of the flow that exist — a synthetic PHI-laden site
corpus is generated, then taken into a node (de-identified, stored, indexed,
bad files quarantined), and the summaries printed. Enrollment, vetting,
sharing, the registry and federated training join it as their issues land.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from node.cli import ingest

app = typer.Typer(help="Run the whole flow on one machine with synthetic data.")
out = Console()


@app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None, typer.Option(help="Working directory (default: a fresh temporary one).")
    ] = None,
    patients: Annotated[int, typer.Option(min=1, help="Patients per site.")] = 4,
    ct_slices: Annotated[int, typer.Option(min=1, help="Slices per CT series.")] = 24,
    jobs: Annotated[int, typer.Option(min=0, help="Worker processes (0: all cores).")] = 0,
) -> None:
    """Generate a synthetic site and take it into a node, printing the summaries."""
    if ctx.invoked_subcommand is not None:
        return
    from radfed.synth.site import write_site_corpus  # numpy + pydicom: only when generating

    base = workdir or Path(tempfile.mkdtemp(prefix="radfed-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    site_dir = base / "site-a" / "pacs-export"
    out.rule("[bold]RadFed demo[/]")
    out.print(f"working directory: {base}")
    out.print(f"generating a synthetic site corpus ({patients} patients) in {site_dir} ...")
    corpus = write_site_corpus(
        site_dir, patients=patients, ct_slices=ct_slices, ct_size=512, cr_size=1024
    )
    out.print(
        f"  {len(corpus.files)} DICOM files with planted PHI, plus one file that is not DICOM"
    )
    (site_dir / "README.txt").write_text("exported by the PACS; not a DICOM file\n")
    home = base / "site-a" / "node-home"
    out.print(
        "taking it into the node: de-identification (PS3.15 Basic Profile + site options, "
        "deny by default), store, index ..."
    )
    ingest(paths=[site_dir], jobs=jobs, home=home, quiet=False)
    out.print(f"node home: {home} (index {home / 'index.sqlite'}, store {home / 'store'})")
    out.print(
        "[dim]Next stages (vetting, sharing, registry, federated training) arrive with their "
        "issues.[/]"
    )
