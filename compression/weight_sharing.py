"""k-means weight sharing (Deep Compression, Han et al., ICLR 2016) as a ``torch.nn.utils.parametrize`` parametrization.

Each shared layer's weight becomes ``codebook[indices]``: ``k`` float centroids (an ``nn.Parameter``, one codebook
per layer) and one cluster index per weight (a buffer). Sharing alone changes neither the size nor the latency
of the network in memory; the saving comes from storing the indices at ``ceil(log2 k)`` bits each, which
``compression.packed_format`` does.

Semantics of a shared layer (``SharedWeight``):

* value: ``weight = codebook[indices]`` exactly (every weight is one of the layer's centroids);
* gradient of the codebook: ``d loss / d codebook[c] = sum of d loss / d weight[i] over the weights i with
  indices[i] == c``, which autograd gives by itself for an indexing op (Deep Compression's tied fine-tuning:
  an optimiser step moves a whole cluster together);
* latent weights: the layer's former ``weight`` Parameter, kept by the parametrization as
  ``<layer>.parametrizations.weight.original``, receives the straight-through gradient ``d loss / d weight``
  (as if it were the weight itself) and is updated by the optimiser like any parameter. It does not change
  the layer's output; it only records, per weight, where the gradients are pushing it, for ``recluster``;
* ``recluster`` first shifts each cluster's latent weights so that their mean equals the (fine-tuned)
  centroid, then re-runs k-means on the latent weights starting from the current centroids, and stores the
  new centroids and assignments. A weight whose latent value has drifted closer to another centroid (than
  its cluster mates drifted) changes cluster. When a cluster's latent weights all drift alike, the shift
  cancels the drift and the fine-tuned centroid stays: a recluster does not undo the tied fine-tuning. (Only
  weights right on a cluster boundary may move without drift, because ``kmeans_codebook`` clusters a
  histogram: 0.15% of the weights of ``VGGUNet(base=8)`` in a recluster right after sharing.)

Only the ``weight`` of convolutions and linear layers is shared. Biases, BatchNorm parameters and buffers stay
float (they are a fraction of a percent of the parameters: 0.1% in ``VGGUNet(base=64)``), and so do layers
with fewer than ``min_weights`` weights, where a codebook saves almost nothing and each weight carries much
of the output (the one-channel 1x1 logits head of the VGGUNet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.nn.utils import parametrize

#: module types whose ``weight`` is shared by default
SHAREABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
#: smallest and largest number of clusters: the indices are packed into 1 to 8 bits
MIN_CLUSTERS, MAX_CLUSTERS = 2, 256
#: layers with fewer weights keep float weights (saving at most 3.5 bytes x 128 - 64 bytes of codebook)
DEFAULT_MIN_WEIGHTS = 128
#: Lloyd's iterations on the histogram run until no bin changes cluster: cheap on 16384 points, and
#: scikit-learn's default tol=1e-4 stopped centroids up to 5% of a cluster's width from convergence
KMEANS_TOLERANCE = 0.0
#: histogram bins k-means runs on (see ``kmeans_codebook``)
HISTOGRAM_BINS = 2**14
KMEANS_INITS = ("linear", "k-means++")


def kmeans_codebook(weights: Tensor, k: int = 16, seed: int = 0, initial_centroids: Tensor | None = None,
                    init: str = "linear", max_iter: int = 300) -> tuple[Tensor, Tensor]:
    """1-D k-means of one layer's weights: ``(codebook, indices)`` with ``codebook[indices] ~= weights``.

    The centroids start evenly spaced over [min, max] (``init="linear"``, Deep Compression's choice) unless
    ``initial_centroids`` is given. Han et al. compare random, density-based and linear starts and find
    linear best for accuracy: density-based starts (what k-means++ tends to) put the centroids in the dense
    cloud around zero and represent the few large weights, which matter most, badly. Measured here on the
    trained base-64 optic-disc network (k = 16, no fine-tuning, 30 synthetic test images): linear start
    mean layer MSE 3.9e-6, logit RMS change 0.088, Dice 0.8944 -> 0.8934; k-means++ 4.1e-6, 0.099, 0.8935.
    Linear is at least as good, so it stays the default; ``init="k-means++"`` is kept to measure again.

    scikit-learn's ``KMeans`` runs on a 16384-bin histogram of the weights (bin centres weighted by their
    counts), not on the weights themselves: a base-64 VGGUNet has 25 M weights, and about 80 Lloyd passes
    over all of them take about a minute on one core, against well under a second for the histogram. The
    bins are 1/1000 of a cluster's width at k = 16. Each weight then goes to its nearest centroid and each
    centroid becomes the exact mean of its weights (one last Lloyd step on the real values), after which a
    weight's centroid is its nearest one up to one bin width.

    A layer with at most ``k`` distinct values is encoded exactly, each distinct value its own centroid, so
    that sharing an already-shared (then unshared) network loses nothing.

    Args:
        weights: any shape; flattened.
        k: the number of clusters, in [2, 256].
        seed: for k-means++ and for scikit-learn's relocation of an empty cluster.
        initial_centroids: start from these centroids (e.g. the current codebook) instead; their number is
            the number of clusters and overrides ``k``.
        init: ``"linear"`` or ``"k-means++"``; ignored with ``initial_centroids``.
        max_iter: Lloyd iterations at most.

    Returns:
        ``codebook``: (k',) centroids in ascending order, in the weights' dtype, ``k' = min(k, number of
        distinct values)`` (``len(initial_centroids)`` when given); ``indices``: int64, shaped like
        ``weights``.
    """
    if initial_centroids is not None:
        k = int(initial_centroids.numel())
        if not 1 <= k <= MAX_CLUSTERS:
            raise ValueError(f"initial_centroids holds {k} centroids: 1 to {MAX_CLUSTERS} are allowed")
    elif isinstance(k, bool) or not isinstance(k, int) or not MIN_CLUSTERS <= k <= MAX_CLUSTERS:
        raise ValueError(f"k={k!r}: the number of clusters must be an int in [{MIN_CLUSTERS}, {MAX_CLUSTERS}] "
                         "(the indices are packed into 1 to 8 bits)")
    if init not in KMEANS_INITS:
        raise ValueError(f"init={init!r}: choose one of {KMEANS_INITS}")
    if weights.numel() == 0:
        raise ValueError("kmeans_codebook got an empty weight tensor: there is nothing to cluster")
    values = weights.detach().reshape(-1).to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(values).all():
        raise ValueError("kmeans_codebook got NaN or infinite weights: the network diverged; retrain or "
                         "reload a finite checkpoint before sharing its weights")
    distinct = np.unique(values)
    if initial_centroids is None and distinct.size <= k:
        centers, labels = distinct, np.searchsorted(distinct, values)
    else:
        if initial_centroids is not None:
            start: np.ndarray | str = initial_centroids.detach().reshape(-1, 1).to("cpu", torch.float64).numpy()
        elif init == "linear":
            start = np.linspace(distinct[0], distinct[-1], k).reshape(-1, 1)
        else:
            start = init
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(distinct[0], distinct[-1]))
        occupied = counts > 0
        if occupied.sum() >= k:
            points, point_weights = ((edges[:-1] + edges[1:]) / 2)[occupied], counts[occupied]
        else:  # fewer occupied bins than clusters (a few tight groups of values): cluster the values themselves
            points, point_weights = values, None
        clustering = KMeans(n_clusters=k, init=start, n_init=1, max_iter=max_iter, tol=KMEANS_TOLERANCE,
                            random_state=seed)
        # one thread: on 16384 points OpenMP threads only add start-up and, on a CPU busy with training,
        # spin-waiting (sharing VGGUNet(base=8) on the busy 2-core machine: 4.2 s with threads, 1.3 s without)
        with threadpool_limits(limits=1):
            clustering.fit(points.reshape(-1, 1), sample_weight=point_weights)
        # ascending centroids: a readable codebook, nearest-centroid search by bisection, and the optimiser's
        # state per centroid keeps following the same centroid across reclusters (1-D Lloyd keeps the order)
        centers = np.sort(clustering.cluster_centers_.reshape(-1))
        labels = np.searchsorted((centers[1:] + centers[:-1]) / 2, values)
        members = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values, minlength=k)
        centers = np.where(members > 0, sums / np.maximum(members, 1), centers)
    codebook = torch.from_numpy(np.ascontiguousarray(centers)).to(weights.dtype)
    indices = torch.from_numpy(np.asarray(labels, dtype=np.int64)).reshape(weights.shape)
    return codebook, indices


class SharedWeight(nn.Module):
    """The parametrization ``latent -> codebook[indices]`` with a straight-through gradient to ``latent``.

    ``codebook`` is a Parameter of k' centroids; ``indices`` a buffer shaped like the weight (int32: half the
    memory of int64, and indexing takes it as is). ``latent - latent.detach()`` is exactly zero, so the value
    is exactly ``codebook[indices]``, while the gradient of the weight also reaches ``latent``.
    """

    def __init__(self, codebook: Tensor, indices: Tensor, like: Tensor):
        super().__init__()
        if indices.shape != like.shape:
            raise ValueError(f"indices of shape {tuple(indices.shape)} do not fit a weight of shape "
                             f"{tuple(like.shape)}")
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < codebook.numel():
            raise ValueError(f"cluster indices must lie in [0, {codebook.numel()}), the codebook's size; got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        self.codebook = nn.Parameter(codebook.detach().to(device=like.device, dtype=like.dtype).clone(),
                                     requires_grad=like.requires_grad)
        # empty_like keeps the weight's memory format, so a channels-last layer gets a channels-last weight
        self.register_buffer("indices", torch.empty_like(like, dtype=torch.int32).copy_(indices))

    def forward(self, latent: Tensor) -> Tensor:
        # latent first: the sum takes its memory format (channels-last convolutions stay channels-last)
        return (latent - latent.detach()) + self.codebook[self.indices]


def share_weights(model: nn.Module, k: int = 16, layers: Sequence[type[nn.Module]] = SHAREABLE_LAYERS,
                  min_weights: int = DEFAULT_MIN_WEIGHTS, exclude: Sequence[str] = (), seed: int = 0,
                  init: str = "linear") -> list[str]:
    """Replace the ``weight`` of every ``layers`` module of ``model`` by k-means shared weights, in place.

    Each layer gets its own codebook (``kmeans_codebook``); the former weights become the latent weights (see
    the module docstring). Build the optimiser afterwards: it must see the codebooks. Undo with ``unshare``.

    Args:
        model: the network; its layers must not be shared already.
        k: clusters per layer, in [2, 256].
        layers: module types whose ``weight`` is shared (subclasses included, e.g. timm's ``Conv2dSame``).
        min_weights: layers with fewer weights keep float weights.
        exclude: module names (as in ``named_modules``) left unshared, with everything below them.
        seed, init: passed to ``kmeans_codebook``.

    Returns:
        The names of the shared layers, in ``named_modules`` order.

    Raises:
        ValueError: bad ``k``, a layer already shared, or no layer to share.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not MIN_CLUSTERS <= k <= MAX_CLUSTERS:
        raise ValueError(f"k={k!r}: the number of clusters must be an int in [{MIN_CLUSTERS}, {MAX_CLUSTERS}]")
    if min_weights < 0:
        raise ValueError(f"min_weights={min_weights} must be >= 0")
    already = list(shared_layers(model))
    if already:
        raise ValueError(f"{len(already)} layers of this model are shared already (e.g. {already[0]!r}): "
                         "call unshare(model) before sharing again")
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, tuple(layers)) or _is_excluded(name, exclude):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.numel() >= max(min_weights, 1):
            candidates.append((name, module))
    if not candidates:
        kinds = ", ".join(layer.__name__ for layer in layers)
        raise ValueError(f"no layer of this {type(model).__name__} can be shared: weight sharing needs a "
                         f"{kinds} with at least min_weights={min_weights} weights (excluded: {list(exclude)})")
    for _, module in candidates:
        codebook, indices = kmeans_codebook(module.weight, k, seed, init=init)
        _register(module, codebook, indices)
    return [name for name, _ in candidates]


@torch.no_grad()
def recluster(model: nn.Module, seed: int = 0, max_iter: int = 300) -> int:
    """Re-run k-means on every shared layer's latent weights; returns how many weights changed cluster.

    Per layer: the latent weights of each cluster are shifted so that their mean is the current centroid
    (the centroid is what tied fine-tuning learned; the spread around it is what the straight-through
    gradient learned), k-means starts from the current centroids, and the codebook and indices are replaced
    in place (same Parameter and buffer objects, so an optimiser keeps working). The number of centroids
    stays the same. A layer whose latent weights have no more distinct values than centroids is left alone.
    """
    moved = 0
    for _, layer, shared in _shared_modules(model):
        latent = layer.parametrizations.weight.original
        codebook, indices = shared.codebook, shared.indices.long()
        # cluster means via index_add: scikit-learn has no "shift clusters to these centroids" step
        flat = latent.detach().reshape(-1).double()
        sums = torch.zeros(codebook.numel(), dtype=torch.float64, device=flat.device)
        sums.index_add_(0, indices.reshape(-1), flat)
        counts = torch.bincount(indices.reshape(-1), minlength=codebook.numel())
        shift = torch.where(counts > 0, codebook.double() - sums / counts.clamp(min=1), 0.0)
        latent.add_(shift[indices].to(latent.dtype))
        if torch.unique(latent).numel() <= codebook.numel():
            continue
        new_codebook, new_indices = kmeans_codebook(latent, seed=seed, initial_centroids=codebook,
                                                    max_iter=max_iter)
        new_indices = new_indices.to(indices.device)
        moved += int((new_indices != indices).sum())
        codebook.copy_(new_codebook)
        shared.indices.copy_(new_indices)
    return moved


def unshare(model: nn.Module) -> list[str]:
    """Remove every weight-sharing parametrization: plain ``weight`` Parameters equal to ``codebook[indices]``.

    The latent weights are dropped. Each weight keeps its Parameter object (``leave_parametrized=True`` sets
    the latent Parameter's data to the shared values), so references to it stay valid. Returns the names.

    PyTorch gives a ``copy.deepcopy`` of a parametrized layer the same (generated) class as the original,
    and removing a parametrization edits that class: unsharing a deep copy of a shared network breaks the
    original. Copy the network before sharing it, or load ``plain_state_dict(model)`` into a plain copy.
    """
    names = []
    for name, layer, _ in list(_shared_modules(model)):  # removing modules while iterating them would fail
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        names.append(name)
    return names


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """The shared layers of ``model``: module name -> its ``SharedWeight`` (codebook and indices)."""
    return {name: shared for name, _, shared in _shared_modules(model)}


def is_shared(model: nn.Module) -> bool:
    return any(True for _ in _shared_modules(model))


def sharing_state(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Everything ``restore_sharing`` needs, per shared layer: codebook, indices (uint8), latent weights.

    Plain tensors (copies, on the CPU) that ``torch.load(weights_only=True)`` reads back, for a checkpoint
    whose state dict holds plain weights.
    """
    state = {}
    for name, layer, shared in _shared_modules(model):
        state[name] = {
            "codebook": shared.codebook.detach().cpu().clone(),
            "indices": shared.indices.detach().cpu().to(torch.uint8),  # k <= 256
            "latent": layer.parametrizations.weight.original.detach().cpu().clone(),
        }
    return state


@torch.no_grad()
def restore_sharing(model: nn.Module, state: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Share ``model``'s layers exactly as ``state`` (from ``sharing_state``) describes; returns the names.

    The layers must be plain (not shared). The latent weights are copied into each layer's weight Parameter
    before it becomes the parametrization's latent tensor.
    """
    modules = dict(model.named_modules())
    problems = []
    for name, entry in state.items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None) if layer is not None else None
        if layer is None or not isinstance(weight, Tensor):
            problems.append(f"{name!r}: no such layer with a weight in this {type(model).__name__}")
        elif parametrize.is_parametrized(layer, "weight"):
            problems.append(f"{name!r}: already parametrized; call unshare(model) first")
        elif entry["latent"].shape != weight.shape or entry["indices"].shape != weight.shape:
            problems.append(f"{name!r}: saved weight shape {tuple(entry['latent'].shape)} vs the layer's "
                            f"{tuple(weight.shape)}")
    if problems:
        raise ValueError("the saved weight-sharing state does not fit this model (was it saved from another "
                         "architecture or width?):\n  - " + "\n  - ".join(problems))
    for name, entry in state.items():
        layer = modules[name]
        layer.weight.copy_(entry["latent"])
        _register(layer, entry["codebook"], entry["indices"].to(torch.int64))
    return list(state)


def plain_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor] | None = None,
                     prefix: str = "") -> dict[str, Tensor]:
    """A state dict in which each shared layer's entries are replaced by its plain ``weight``.

    ``<layer>.parametrizations.weight.original`` / ``.0.codebook`` / ``.0.indices`` become
    ``<layer>.weight = codebook[indices]``, the key an unshared network of the same architecture loads.

    Args:
        model: the (shared) network the entries belong to.
        state_dict: a state dict holding ``model``'s entries under ``prefix`` (e.g. a LightningModule's,
            with ``prefix="net."``); default ``model.state_dict()``.
        prefix: the prefix of ``model``'s keys in ``state_dict``.
    """
    source = dict(model.state_dict() if state_dict is None else state_dict)
    for name, shared in shared_layers(model).items():
        layer_prefix = f"{prefix}{name}." if name else prefix
        for key in ("original", "0.codebook", "0.indices"):
            source.pop(f"{layer_prefix}parametrizations.weight.{key}", None)
        source[f"{layer_prefix}weight"] = shared.codebook.detach()[shared.indices]
    return source


def _register(module: nn.Module, codebook: Tensor, indices: Tensor) -> None:
    parametrize.register_parametrization(module, "weight", SharedWeight(codebook, indices, module.weight))


def _shared_modules(model: nn.Module):
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            found = [p for p in module.parametrizations.weight if isinstance(p, SharedWeight)]
            if found:
                yield name, module, found[0]


def _is_excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == skipped or name.startswith(f"{skipped}.") for skipped in exclude)
