"""save/load keeps a model's floating dtype (a float32 model reloads as float32 and predicts the same)."""
import numpy as np
import pandas as pd
import pytest
import torch

import latentgp as lgp


def _roundtrip(model, tmp_path):
    path = tmp_path / "model.pt"
    model.save(path)
    return lgp.load(path)


@pytest.mark.parametrize("cls", [lgp.GPRegressor, lgp.StateSpaceGP])
def test_regressors_keep_float32(cls, tmp_path):
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 5, 40))
    y = np.sin(x) + 0.1 * rng.standard_normal(40)
    kernel = lgp.kernels.Matern(nu=1.5) if cls is lgp.StateSpaceGP else None
    model = cls(kernel=kernel, dtype=torch.float32).fit(x, y, steps=5, progress=False)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32
    assert next(loaded.prior.parameters()).dtype == torch.float32
    new = np.linspace(0, 6, 7)
    np.testing.assert_array_equal(loaded.predict(new)["mean"].to_numpy(), model.predict(new)["mean"].to_numpy())


def test_grid_gp_keeps_float32(tmp_path):
    grid = [np.linspace(0, 1, 6), np.linspace(0, 1, 5)]
    values = np.add.outer(np.sin(3 * grid[0]), np.cos(2 * grid[1]))
    kernels = [lgp.kernels.Matern(nu=2.5), lgp.kernels.Matern(nu=2.5)]
    model = lgp.GridGP(kernels, grid, dtype=torch.float32).fit(values, steps=3, progress=False)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32
    pts = np.array([[0.3, 0.4], [0.9, 0.1]])
    np.testing.assert_array_equal(loaded.predict(pts)["mean"].to_numpy(), model.predict(pts)["mean"].to_numpy())


def test_poisson_latent_keeps_float32(tmp_path):
    counts = np.random.default_rng(1).poisson(2.0, size=(2, 30, 5))
    model = lgp.PoissonLatentGP(1, dtype=torch.float32).fit(counts, steps=2, progress=False)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32 and loaded.C.dtype == torch.float32
    np.testing.assert_array_equal(loaded.latents(), model.latents())


def test_pde_solver_keeps_float32(tmp_path):
    solver = lgp.GPPDESolver(operator="poisson", domain=[(0, 1)], n_collocation=20, num_mixtures=2,
                             dtype=torch.float32)
    solver.fit(source=lambda x: -np.pi ** 2 * np.sin(np.pi * x), boundary=lambda x: 0 * x, steps=2, progress=False)
    loaded = _roundtrip(solver, tmp_path)
    assert loaded.dtype == torch.float32
    x = np.linspace(0, 1, 5)
    np.testing.assert_array_equal(loaded.predict(x)["mean"].to_numpy(), solver.predict(x)["mean"].to_numpy())


def _points(n=40, d=2, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, d))
    return X, np.sin(4 * X[:, 0]) + X[:, 1] + 0.05 * rng.standard_normal(n)


@pytest.mark.parametrize("make", [lambda: lgp.SICGP(rho=3.0, dtype=torch.float32),
                                  lambda: lgp.SVGP(num_inducing=10, dtype=torch.float32)], ids=["SICGP", "SVGP"])
def test_sparse_regressors_keep_float32(make, tmp_path):
    X, y = _points()
    model = make().fit(X, y, steps=5, progress=False, seed=0)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32
    new = X[:5] + 0.01
    np.testing.assert_array_equal(loaded.predict(new)["mean"].to_numpy(), model.predict(new)["mean"].to_numpy())


def test_tucker_and_multitask_keep_float32(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(4)
    df = pd.DataFrame({"a": rng.uniform(0, 1, 60).round(1), "b": rng.uniform(0, 1, 60).round(1)})
    df["v"] = np.sin(3 * df["a"]) * np.cos(2 * df["b"]) + 0.01 * rng.standard_normal(60)
    df = df.drop_duplicates(["a", "b"])
    tucker = lgp.FunctionalTucker(1, dtype=torch.float32).fit(df, y="v", modes=["a", "b"], steps=3, progress=False)
    loaded = _roundtrip(tucker, tmp_path)
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded.predict(df[["a", "b"]])["mean"].to_numpy(),
                                  tucker.predict(df[["a", "b"]])["mean"].to_numpy())

    x = np.linspace(0, 1, 12)
    long = pd.DataFrame({"x": np.tile(x, 2), "task": np.repeat([0, 1], 12), "y": np.r_[np.sin(5 * x), np.cos(5 * x)]})
    mt = lgp.MultitaskGP(num_tasks=2, dtype=torch.float32).fit(long, x="x", task="task", y="y", steps=3, progress=False)
    loaded = _roundtrip(mt, tmp_path)
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded.predict(long)["mean"].to_numpy(), mt.predict(long)["mean"].to_numpy())


def test_gpvae_keeps_float32(tmp_path):
    Y = np.random.default_rng(5).standard_normal((4, 20, 3))
    model = lgp.GPVAE(latent_dim=1, dtype=torch.float32).fit(Y, steps=2, batch_size=2, progress=False, seed=0)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32
    np.testing.assert_array_equal(loaded.latents(), model.latents())


@pytest.mark.parametrize("cls", [lgp.Magma, lgp.MagmaClust])
def test_magma_keeps_float32(cls, tmp_path):
    from latentgp.simulate_magma import simulate_magma

    train = simulate_magma(6, 10, 2, seed=0).train
    model = (cls(n_clusters=2, dtype=torch.float32) if cls is lgp.MagmaClust else cls(dtype=torch.float32))
    model.fit(train, steps=2, progress=False)
    loaded = _roundtrip(model, tmp_path)
    assert loaded.dtype == torch.float32
    new_task = train[train["ID"] == train["ID"].iloc[0]].iloc[:4]
    grid = pd.DataFrame({"Input": np.linspace(0, 10, 7)})
    np.testing.assert_array_equal(loaded.predict(new_task, grid)["mean"].to_numpy(),
                                  model.predict(new_task, grid)["mean"].to_numpy())
