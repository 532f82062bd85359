"""Samples of the classifier where its inputs are dense: the column-space consistency.

For the classifier z = W e + b and the mean loss over K < C samples, the
gradient G = [grad_W, grad_b] = (1/K) sum_n g_n [e_n, 1]^T has rank K: each
sample's input [e_n, 1] lies in G's row space and its output gradient
g_n = softmax(W e_n + b) - onehot(y_n) in G's column space. Nothing here needs
the inputs to have zeros (a ResNet's global average pool, any activation),
which is what ``decompose``'s vertices need.

So a sample is a point [e, 1] = V n of the row space (V its orthonormal basis,
K - 1 free coordinates once the last one is fixed to 1) and a class c for which
g(n, c) = softmax(P n) - onehot(c), with P = [W, b] V the logits' map, lies in
the column space: C - K equations in K - 1 unknowns, the label being the class
that fits best. Each search minimises the part of g outside the column space
relative to |g| (Levenberg-Marquardt, all starts at once, every step a K x K
solve), started from the embeddings G[j] / G[j, -1] of G's rows: mixtures of the
samples, iLRG's class embedding among them, which is the sample where a class
has one.

A point found is a sample when it also passes Wedderburn's rank-reduction
test: for G = (1/K) sum_n g_n x_n^T with independent g_n and x_n,
x_m^T G^+ g_n = K [m = n], one equation more, which does not blur where
samples' terms overlap (many samples of a class, an untrained model). The
samples found are taken out of the gradient and the search repeated on what
they leave, of lower rank and with purer rows; each point found there is
polished on the whole gradient, so that errors do not pile up from round to
round.

The problem is small whatever the embedding's width: after one SVD of G every
step works in the K-dimensional row-space coordinates and the C classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Levenberg-Marquardt steps per search (each one K x K solve per start)
STEPS = 60
#: how many times the column space's resolution angle a candidate's residual may be
ACCEPT_FACTOR = 16.0
#: starts per search and sample left, the rows with the largest bias gradients first
STARTS_PER_SAMPLE = 4
#: a search of r samples left is well determined where its C - r equations are at least this
#: many times its r - 1 free coordinates (on a VGG-16 head, 100 classes: with 50 left the
#: points found fit to 1e-9 and lie 1e-3 to 5e-2 away from any sample; with 40 left, 2e-5
#: to 9e-4; with 33, 2e-5)
DETERMINED = 1.5
#: classes whose miss ``best_labels`` measures directly, the expansion's best first
SHORTLIST = 4
#: a step that lowers a start's cost by less than this share has reached its floor
FLAT = 1e-6
#: the damping at which a search has stopped finding better points
STALLED = 1e8


@dataclass(frozen=True)
class Consistency:
    """One gradient's consistency problem: its resolved spaces and the model's logits on them."""

    gradient: torch.Tensor  # C x (d+1)
    basis: torch.Tensor  # (d+1) x r, the row space
    singular: torch.Tensor  # r
    left: torch.Tensor  # C x r, the left singular vectors: gradient @ basis / singular
    columns: torch.Tensor  # C x r, an orthonormal basis of the column space (left, made exact)
    logits: torch.Tensor  # C x r: the logits of the input basis @ n are logits @ n
    offset: torch.Tensor  # r: n = offset + free @ y has last coordinate 1
    free: torch.Tensor  # r x (r - 1)
    noise: float  # the gradient's per-entry noise
    tolerance: float  # the relative miss a sample's point may have

    @classmethod
    def of(cls, gradient, weight, bias, basis, singular, noise) -> Consistency | None:
        """The problem on the resolved space ``basis`` / ``singular`` of ``gradient`` with
        per-entry ``noise`` (``decompose.subspace``); None where no sample can be in it."""
        last = basis[-1]  # every sample's last coordinate is 1: the coordinates obey last . n = 1
        if basis.shape[1] == 0 or float(last.norm()) == 0.0:
            return None
        # A direction of singular value s is resolved to an angle of about noise * scale / s:
        # a sample's relative miss may be 16 times that.
        scale = math.sqrt(gradient.shape[0]) + math.sqrt(gradient.shape[1])
        angle = max(noise * scale / float(singular[-1]), torch.finfo(gradient.dtype).eps)
        left = gradient @ basis / singular
        return cls(
            gradient,
            basis,
            singular,
            left,
            torch.linalg.qr(left)[0],
            torch.cat([weight, bias[:, None]], dim=1) @ basis,
            last / last.square().sum(),
            torch.linalg.svd(last[None])[2][1:].T,
            noise,
            ACCEPT_FACTOR * angle,
        )

    def search(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The points [e, 1] (rows) the searches from ``inputs`` reach, and their relative miss."""
        if self.basis.shape[1] == 1:
            # One sample: the whole row space is its input.
            point = (self.basis[:, 0] / self.basis[-1, 0])[None]
            return point.expand(inputs.shape[0], -1), self.miss(point).expand(inputs.shape[0])
        y = (inputs @ self.basis) @ self.free
        eps = torch.finfo(y.dtype).eps
        # Each search runs to the working precision: a sample's point is then exact to it.
        y, miss = levenberg_marquardt(
            y, self.logits @ self.offset, self.logits @ self.free, self.columns, eps
        )
        return (self.offset + y @ self.free.T) @ self.basis.T, miss

    def miss(self, inputs: torch.Tensor) -> torch.Tensor:
        """Each input's relative miss |Q g| / |g| at its best label (inputs in the row space)."""
        p = torch.softmax((inputs @ self.basis) @ self.logits.T, dim=1)
        return label_misses(p, self.columns)[1].amin(1)

    def errors(self, inputs: torch.Tensor, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Each input's best label and output gradient g = p - onehot(label)."""
        p = torch.softmax(inputs[:, :-1] @ weight.T + bias, dim=1)
        labels = best_labels(p, self.columns)
        return labels, p - torch.eye(p.shape[1], dtype=p.dtype)[labels]

    def resolution(self, errors: torch.Tensor, weights: torch.Tensor | None = None):
        """The relative miss allowed each output gradient g (rows, or any leading shape): the
        noise moves the column space's direction of singular value s by about
        noise * scale / s, and g has the weights |S^-1 U^T g| on those directions (given, or
        computed here); 16 times that, and never below the working precision's."""
        scale = math.sqrt(self.gradient.shape[0]) + math.sqrt(self.gradient.shape[1])
        if weights is None:
            weights = torch.linalg.vector_norm((errors @ self.left) / self.singular, dim=-1)
        angle = self.noise * scale * weights / torch.linalg.vector_norm(errors, dim=-1)
        return ACCEPT_FACTOR * angle.clamp_min(torch.finfo(errors.dtype).eps)

    def ratios(self, inputs: torch.Tensor, errors: torch.Tensor, num_images: int) -> torch.Tensor:
        """x_m^T G^+ g_n / K for every pair, with G^+ = V S^-1 U^T on the resolved part."""
        return ((inputs @ self.basis) / self.singular) @ (self.left.T @ errors.T) / num_images

    def passes(self, errors, miss, ratios) -> torch.Tensor:
        """Which points of the search (with their output gradients ``errors``, relative
        ``miss`` and Wedderburn ratio x^T G^+ g / K) are samples: g in the column space to
        within its resolution, and the ratio 1 (it is 0 against another sample). The ratio's
        error grows with the resolution as the point's does: the threshold lies halfway, on
        a log scale, between the resolution and 1."""
        resolution = self.resolution(errors)
        return (miss <= resolution) & ((ratios - 1).abs() <= resolution.sqrt())

    def fits(self, inputs: torch.Tensor, weight, bias, num_images: int, errors=None):
        """The labels with which each input [e, 1] (rows; e.g. a vertex of the row space's
        non-negative part) would be a sample: ``(classes, passing)``, both inputs x
        ``SHORTLIST``, the classes that fit the column space best and which of them pass.

        With the embedding given no coordinate is free, and the C - K equations test each
        label, and Wedderburn's ratio the input. Where C - K is small, two labels c and c'
        both pass when e_c - e_c' lies nearly in the column space: the equations do not
        decide between them.

        The ratio's threshold is the search points' (halfway, on a log scale, between the
        resolution and 1), widened by what the input's own error allows. An input known only
        to within a distance d (``errors``, one norm per input: a vertex of a confident
        sample, whose term is small, is resolved roughly) moves g by (diag(p) - p p^T) W
        delta, of norm at most 2 max_c p_c (1 - p_c) |W| d (Gershgorin's bound on the first
        factor, the spectral norm of the second): that share of |g| is allowed on top of the
        column space's resolution, and the ratio x^T G^+ g / K moves by at most
        d (|S^-1 U^T g| + |S^-1 V^T x| 2 max_c p_c (1 - p_c) |W|) / K. Never more than 1/2,
        which no longer tells a sample from another. A corner of the vertex search beside a
        sample (an untrained VGG-16's embeddings nest often) is an exact vertex, d tiny: the
        threshold stays tight, and the few percent it lies off the sample show.
        """
        p = torch.softmax(inputs[:, :-1] @ weight.T + bias, dim=1)
        classes, miss = label_misses(p, self.columns)
        eye = torch.eye(p.shape[1], dtype=p.dtype)
        outputs = p[:, None, :] - eye[classes]  # inputs x listed x C
        weighted = (outputs @ self.left) / self.singular  # S^-1 U^T g, inputs x listed x r
        coordinates = inputs @ self.basis  # x^T V
        ratios = (coordinates[:, None, :] * weighted).sum(2) / num_images  # x^T G^+ g / K
        weights = torch.linalg.vector_norm(weighted, dim=2)
        resolution = self.resolution(outputs, weights)
        allowed = resolution.sqrt()
        if errors is not None:
            spread = 2 * (p * (1 - p)).amax(1) * torch.linalg.matrix_norm(weight, ord=2)
            moved = spread * errors.to(p.dtype)
            resolution = resolution + moved[:, None] / torch.linalg.vector_norm(outputs, dim=2)
            reach = torch.linalg.vector_norm(coordinates / self.singular, dim=1)
            allowed = (
                allowed
                + errors.to(p.dtype)[:, None]
                * (weights + reach[:, None] * spread[:, None])
                / num_images
            )
        return classes, (miss <= resolution) & ((ratios - 1).abs() <= allowed.clamp_max(0.5))


def determined(samples: int, num_classes: int) -> bool:
    """Whether a search for ``samples`` points among ``num_classes`` is well determined."""
    return num_classes - samples >= DETERMINED * (samples - 1)


def most_determined(num_classes: int) -> int:
    """The most samples a well-determined search can look for among ``num_classes``."""
    return int((num_classes + DETERMINED) // (1 + DETERMINED))


def row_starts(gradient: torch.Tensor, noise: float, room: int) -> torch.Tensor:
    """Starting inputs: every row of G that is not noise, as an embedding G[j] / G[j, -1].

    Row j weighs each sample n by its output gradient's entry g_nj, so the rows are as many
    mixtures of the samples: iLRG's class embedding of a class with one sample (it is that
    sample), the samples that a class's row weighs most (a sample the model wrongly puts in
    class j dominates row j), and where several samples share a class, other mixtures of
    them than their own class's row, which lies between them.
    """
    bias = gradient[:, -1]
    # The largest of C Gaussian errors of size ``noise``, plus one.
    threshold = (math.sqrt(2 * math.log(max(bias.numel(), 2))) + 1) * noise
    rows = torch.nonzero(bias.abs() > threshold).flatten()
    # Each start costs C x K^2 per step: as many as a few per sample left, the largest first
    # (the classes the samples are in come first, their bias gradients being -(1 - p)).
    rows = rows[bias[rows].abs().argsort(descending=True)[: STARTS_PER_SAMPLE * room]]
    return gradient[rows] / bias[rows, None]


def new_samples(
    whole: Consistency,
    rest: Consistency,
    found: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples not in ``found`` (inputs, rows): searched in ``rest`` (what the samples found
    leave of the gradient), polished on ``whole`` (the gradient itself) where that search is
    determined, and kept where they pass Wedderburn's test there, against each other and
    against ``found``. Returns their inputs [e_n, 1] (rows) and labels, best first."""
    inputs, miss = rest.search(row_starts(rest.gradient, rest.noise, rest.basis.shape[1]))
    converged = torch.nonzero(miss <= rest.tolerance).flatten()
    inputs = inputs[converged[miss[converged].argsort()]]
    if inputs.shape[0] == 0:
        return inputs, torch.zeros(0, dtype=torch.long)
    if determined(whole.basis.shape[1], whole.gradient.shape[0]):
        inputs, miss = whole.search(inputs)
    else:
        # On the whole gradient a point has too many free coordinates for its equations: a
        # search there slides along the points that fit, away from the sample, so the
        # point stays where the determined search in what the others leave put it.
        miss = whole.miss(inputs)
    order = miss.argsort()
    inputs, miss = inputs[order], miss[order]
    labels, errors = whole.errors(inputs, weight, bias)
    single = whole.passes(errors, miss, whole.ratios(inputs, errors, num_images).diagonal())
    return accepted(whole, inputs[single], labels[single], found, weight, bias, num_images)


def accepted(
    whole: Consistency,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    found: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_images: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the inputs [e, 1] (rows, best first) that pass as samples with ``labels``, those
    that are no sample in ``found`` nor one kept before them: x_m^T G^+ g_n / K is near 0
    for another sample and near 1 for the same one again, so the midpoint tells them apart."""
    p = torch.softmax(inputs[:, :-1] @ weight.T + bias, dim=1)
    errors = p - torch.eye(p.shape[1], dtype=p.dtype)[labels]
    ratios = whole.ratios(inputs, errors, num_images)
    against = whole.ratios(found, errors, num_images)  # found x candidates
    kept: list[int] = []
    for index in range(inputs.shape[0]):
        if bool((against[:, index].abs() > 0.5).any()):
            continue
        if kept and bool((ratios[kept, index].abs() > 0.5).any()):
            continue
        kept.append(index)
    return inputs[kept], labels[kept]


def best_labels(p: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """For each row p of probabilities, the class c whose g = p - onehot(c) the column space
    holds best, relative to |g|."""
    classes, miss = label_misses(p, columns)
    return classes.gather(1, miss.argmin(1, keepdim=True)).squeeze(1)


def label_misses(p: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row p, the ``SHORTLIST`` classes c whose g = p - onehot(c) the column space
    holds best and their relative misses |Q g| / |g|, Q the projector off it.

    For every class at once |Q g|^2 = |Q p|^2 - 2 (Q p)_c + Q_cc and |g|^2 = |p|^2 - 2 p_c + 1,
    but the expansion cancels terms of size 1 and cannot tell misses below about 1e-8
    apart in float64 (a sample's own label misses by 1e-14, a neighbour's by 1e-7): the
    classes it ranks first are measured again directly.
    """
    outside = p - (p @ columns) @ columns.T
    diagonal = 1 - columns.square().sum(1)
    expansion = outside.square().sum(1, keepdim=True) - 2 * outside + diagonal
    size = p.square().sum(1, keepdim=True) - 2 * p + 1
    classes = (expansion / size).topk(min(SHORTLIST, p.shape[1]), dim=1, largest=False).indices
    # Q onehot(c) = onehot(c) - U U_c^T for each listed class: rows x listed x C
    eye = torch.eye(p.shape[1], dtype=p.dtype)
    projected = eye[classes] - columns[classes] @ columns.T
    miss = (outside[:, None, :] - projected).square().sum(2) / size.gather(1, classes)
    return classes, miss.sqrt()


def relative_miss(
    y: torch.Tensor,
    base: torch.Tensor,
    slope: torch.Tensor,
    columns: torch.Tensor,
    labels: torch.Tensor | None = None,
    jacobian: bool = False,
):
    """f = Q g / |g| for g = softmax(base + slope y) - onehot(label) (one row per start), with
    Q the projector off the column space and each start's label its ``best_labels`` unless
    given; with ``jacobian``, also df/dy (starts x C x (r - 1))."""
    p = torch.softmax(base + y @ slope.T, dim=1)
    if labels is None:
        labels = best_labels(p, columns)
    g = p.clone()
    g[torch.arange(g.shape[0]), labels] -= 1
    size = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    outside = g - (g @ columns) @ columns.T
    f = outside / size
    if not jacobian:
        return f
    # dg/dy = (diag(p) - p p^T) slope; d(Qg/|g|) = (Q dg - f (g/|g|)^T dg) / |g|
    dg = p[:, :, None] * slope[None] - p[:, :, None] * (p @ slope)[:, None, :]
    q_dg = dg - columns @ (columns.T @ dg)
    along = ((g / size)[:, None, :] @ dg).squeeze(1)  # starts x (r - 1)
    return f, (q_dg - f[:, :, None] * along[:, None, :]) / size[:, :, None]


def levenberg_marquardt(
    y: torch.Tensor,
    base: torch.Tensor,
    slope: torch.Tensor,
    columns: torch.Tensor,
    goal: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise |f(y)| for every start at once; returns the points and their |f|. A start
    stops once |f| <= ``goal``, once no step helps (its damping past ``STALLED``) or once
    its steps have reached the floor its data allow (a cost lowered by under ``FLAT``). Each
    step keeps the label that fits best where it starts; the cost is the best label's."""
    damping = torch.full((y.shape[0],), 1e-3, dtype=y.dtype)
    cost = relative_miss(y, base, slope, columns).square().sum(1)
    flat = torch.zeros(y.shape[0], dtype=torch.bool)
    eye = torch.eye(y.shape[1], dtype=y.dtype)
    for _ in range(STEPS):
        active = torch.nonzero((cost > goal**2) & (damping < STALLED) & ~flat).flatten()
        if active.numel() == 0:
            break
        here = y[active]
        f, jac = relative_miss(here, base, slope, columns, jacobian=True)
        normal = jac.transpose(1, 2) @ jac
        lifted = damping[active, None, None] * (
            eye * normal.diagonal(dim1=1, dim2=2)[:, None] + eye
        )
        step, info = torch.linalg.solve_ex(normal + lifted, -(jac.transpose(1, 2) @ f[:, :, None]))
        trial = here + step.squeeze(2)
        trial_cost = relative_miss(trial, base, slope, columns).square().sum(1)
        # A singular system (a flat direction at tiny damping) is a step that did not help.
        trial_cost = torch.where((info == 0) & trial_cost.isfinite(), trial_cost, torch.inf)
        better = trial_cost < cost[active]
        flat[active] = better & (trial_cost > (1 - FLAT) * cost[active])
        y[active] = torch.where(better[:, None], trial, here)
        cost[active] = torch.where(better, trial_cost, cost[active])
        damping[active] = torch.where(better, damping[active] / 3, damping[active] * 4)
    return y, cost.sqrt()
