"""Loaders for the data sets in data/ and simulators shared by tests, tutorials and the demo."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _path(name: str) -> Path:
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: latentgp's data sets ship in the repository's data/ folder "
            "(install from a clone of the repository, e.g. `pip install -e .`)."
        )
    return path


def load_co2() -> pd.DataFrame:
    """Monthly mean atmospheric CO2 at Mauna Loa, 1958-2001 (see data/README.md).

    Columns: ``month`` (str YYYY-MM), ``year`` (decimal year), ``co2`` (ppmv), ``n_weeks``.
    """
    return pd.read_csv(_path("mauna_loa_co2_monthly.csv"))


def load_elnino() -> pd.DataFrame:
    """Monthly Niño 1+2 sea surface temperature, 1950-2010 (see data/README.md): a (year x month)
    continuous-indexed tensor in long format. Columns: ``year``, ``month`` (1-12), ``sst`` (°C)."""
    return pd.read_csv(_path("elnino_sst.csv"))


def load_chickweight() -> pd.DataFrame:
    """Body weight of 50 chicks on 4 diets, weighed every second day from birth to day 20 and on day 21
    (Crowder & Hand 1990; R's ``ChickWeight``, see data/README.md): 578 rows in long format, 5 chicks
    with fewer than 12 weighings. Columns: ``Chick`` (ID 1-50), ``Diet`` (1-4), ``Time`` (days),
    ``weight`` (grams)."""
    return pd.read_csv(_path("chickweight.csv"))
