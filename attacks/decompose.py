"""``decompose``: per-sample labels by disaggregating a linear layer's gradient.

For a linear layer z = W a + b and the mean loss over K samples, the gradient
[grad_W, grad_b] = (1/K) sum_n g_n [a_n, 1]^T is a sum of K rank-one terms: its
row space is spanned by the inputs [a_n, 1], whose last coordinate 1 fixes
each one's scale. Where the inputs come out of a ReLU they are non-negative
with many zeros, and each sample's [a_n, 1] is a vertex of the non-negative
part of that row space (the observation behind SPEAR, Dimitrov et al.,
NeurIPS 2024, who find such vectors by sampling; here they are found by linear
programmes, which does not slow down with K). A vertex that is a sample
vanishes on far more coordinates than the r - 1 any vertex has, and is refined
to the exact null vector of those coordinates.

Two layers, by what the gradient allows:

- the classifier, z = W e + b: its inputs are the embeddings. The errors
  p_n - y_n all sum to zero, so its gradient has rank at most C - 1: used
  while K < C.
- the hidden layer before it, where the classifier's input is ReLU(W' a + b')
  (FCN-3, LeNet-5, the VGG head): rank K up to its width. Its inputs a_n give
  the embeddings by running the layer and its ReLU.

Each candidate's label follows from the model alone, with nothing fitted: the
server computes p_n = softmax(W e_n + b), so a sample with label c adds the
known term (1/K) g_c [a_n, 1]^T, with g_c = p_n - onehot(c) at the classifier
and (W^T (p_n - onehot(c))) * [z_n > 0] at the hidden layer. ``identify``
takes out the terms the gradient holds exactly (a matching pursuit with exact
amplitudes, robust to candidates that are no sample) and judges the rest by a
joint least squares; what the samples found leave of the gradient is searched
once more for the ones whose vertex the first search missed.

What limits it: a sample the model fits with p_y = 1 - eps adds eps to the
gradient; its direction is resolved only to (noise / eps), and below the
gradient's rounding it is not there at all (``Restoration.separated`` counts
the samples told apart). Every sample kept is settled at the end against the
whole gradient of its layer (``settle``); the counts are iLRG's on the whole
gradient, raised where the settled samples prove more (``proven_counts``). A vertex needs r - 1
zeros; inputs with no zeros (after a global average pool, ResNets) are found by
the column-space consistency of ``attacks.consistency`` instead, which runs
first and needs C - r >= 1.5 (r - 1). K = 64 on LeNet-5 (84 units, about 40 active) or on a
ResNet of 100 classes has neither, separates nothing, and the answer is iLRG's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from attacks.consistency import Consistency, accepted, determined, most_determined, new_samples
from attacks.cpu_threads import one_cpu_thread
from attacks.gradients import last_linear_layer
from attacks.ilrg import ILRG, adjust_to_total, round_counts
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack
from attacks.rlg import rounding_of, sketched_svd
from attacks.vertex_programme import VertexProgramme

#: a direction whose singular value is below this many times the noise's largest is not resolved
RESOLVED_RATIO = 8.0
#: linear programmes per dimension of the space before the vertex search gives up
SEARCH_FACTOR = 3
#: programmes in a row without a new sample after which the search stops (a space whose
#: non-negative part has corners everywhere, as where the samples share most active units)
PATIENCE = 8
#: searches for vertices, each in what the samples found before leave of the gradient
ROUNDS = 2
#: the column space judges the vertices where its C - K equations are at least this share of
#: the K samples (VGG-16 at K = 64 of 100: 36 of 32; FCN-3 at K = 8 of 10: 2 of 4)
TESTED = 0.5
#: a sample's label holds when its solved output gradient is this close to the label's, against
#: the second-nearest label's (``settle``)
SETTLE_MARGIN = 0.25
#: modules that pass the hidden layer's ReLU output to the classifier unchanged in eval mode
PASS_THROUGH = (nn.Dropout, nn.Identity, nn.Flatten)


@dataclass(frozen=True)
class Subspace:
    """An orthonormal basis of one side of a gradient, with what its precision allows."""

    basis: torch.Tensor  # m x r, orthonormal columns
    singular: torch.Tensor  # r singular values
    noise: float  # per-entry noise of the gradient (rounding, or the spectrum's tail)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def tolerance(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Per-vector zero tolerance of v = basis @ c (one column of c per vector).

        A basis direction with singular value s is perturbed by about noise / s per
        coordinate, so v's coordinates carry noise * ||c / s||; the tolerance is the
        largest of m such Gaussian errors (sqrt(2 ln m) of them) plus one.
        """
        spread = torch.linalg.vector_norm(coefficients / self.singular[:, None], dim=0)
        return (math.sqrt(2 * math.log(self.basis.shape[0])) + 1) * self.noise * spread


def rounding_noise(matrix: torch.Tensor, precision: float) -> float:
    """Per-entry rounding noise of ``matrix`` stored at ``precision``: half an ulp of its rms entry."""
    return 0.5 * precision * float(matrix.square().mean().sqrt())


def subspace(matrix: torch.Tensor, rank_bound: int, precision: float) -> Subspace:
    """The resolved part of ``matrix``'s row space, for a matrix of rank at most ``rank_bound``
    plus noise.

    The noise is the larger of the storage rounding and the first singular value
    past ``rank_bound`` (spread over the matrix's entries, as a random matrix's
    largest singular value is its entry size times sqrt(m) + sqrt(n)). A large
    matrix goes through RLG's randomized range finder (``rlg.sketched_svd``): its
    rank is at most the bound, so the K + 10 sketched directions hold it and the
    SVD costs C x d x (K + 10) instead of C x d x min(C, d).
    """
    rows, cols = matrix.shape
    sketched = sketched_svd(matrix, rank_bound)
    if sketched is None:
        _, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        _, s, vh = sketched
    scale = math.sqrt(rows) + math.sqrt(cols)
    # The SVD's own rounding: a backward error of eps * s_1 in norm (LAPACK's, at the float64
    # it works in), which may sit on a single entry. A float64 gradient's storage rounding of
    # its rms entry is smaller than that, so its zeros were judged below the arithmetic's own
    # error; beside a float32 gradient's rounding it is negligible.
    working = torch.finfo(s.dtype).eps * float(s[0]) if s.numel() else 0.0
    noise = max(rounding_noise(matrix, precision), working)
    if rank_bound < s.numel():
        noise = max(noise, float(s[rank_bound]) / scale)
    resolved = int((s[:rank_bound] > RESOLVED_RATIO * noise * scale).sum())
    return Subspace(vh[:resolved].T.contiguous(), s[:resolved], noise)


def simplex_vertices(
    space: Subspace,
    generator: torch.Generator,
    enough: int | None = None,
    known: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, float]]:
    """The samples among the vertices of {v in span : v >= 0, v[-1] = 1}, refined, each with
    the norm of its error (``refine``'s).

    Every sample's [e_n, 1] is non-negative with last coordinate 1, so the set
    holds their convex hull, and each sample's vector is one of its vertices
    wherever no sample's support lies inside another's. One vertex per linear
    programme: maximise, then minimise, a random direction orthogonal to the
    samples found so far; the set not inside that hyperplane has a vertex off
    it at one of the ends. The set can be larger than the hull (the
    non-negative part of the span has corners no sample is at); such a corner
    has only the r - 1 zeros where it was cut and is passed over, up to
    ``SEARCH_FACTOR`` programmes per dimension in all, or until ``enough`` are
    found. A search that goes on from an earlier one is given its vertices
    (``known``, rows) and looks away from them. Coordinates where the whole space
    vanishes (a unit no sample activates) are no constraint and are left out.
    """
    q = space.basis
    m, r = q.shape
    if r == 0:
        return []
    tolerance = space.tolerance(torch.eye(r, dtype=q.dtype)).amax()
    live = q.abs().amax(dim=1) > tolerance
    live[-1] = True
    programme = VertexProgramme(q[live].numpy(), q[-1].numpy())
    found: list[tuple[torch.Tensor, float]] = []
    coefficients: list[torch.Tensor] = [] if known is None else list(known @ q)
    goal = min(r - len(coefficients), enough or r)
    idle = 0
    for _ in range(SEARCH_FACTOR * r):
        if len(found) >= goal or idle == PATIENCE:
            break
        idle += 1
        direction = torch.randn(r, dtype=q.dtype, generator=generator)
        if coefficients:
            basis = torch.linalg.qr(torch.stack(coefficients, dim=1))[0]
            direction -= basis @ (basis.T @ direction)
        for sign in (1.0, -1.0):
            solution = programme.vertex(sign * direction.numpy())
            if solution is None:
                continue
            vertex = torch.from_numpy(solution)
            if abs(float(vertex @ direction)) <= tolerance * float(direction.norm()):
                continue  # on the hyperplane of those found: nothing new this way
            refined, zeros, error = refine(space, q @ vertex, live)
            if zeros < 2 * (r - 1):
                break
            # A weakly resolved sample can show as several nearby corners: one sample within
            # the two estimates' errors, kept at the better of them.
            same = [
                index
                for index, (other, other_error) in enumerate(found)
                if float(torch.linalg.vector_norm(refined - other)) <= error + other_error
            ]
            if not same:
                found.append((refined, error))
                coefficients.append(q.T @ refined)
                idle = 0
            elif error < found[same[0]][1]:
                found[same[0]] = (refined, error)
                coefficients[len(coefficients) - len(found) + same[0]] = q.T @ refined
            break
    return found


def refine(
    space: Subspace, vertex: torch.Tensor, live: torch.Tensor
) -> tuple[torch.Tensor, int, float]:
    """The vertex moved onto the exact null vector of the rows it vanishes on, how many, and
    the norm of its error (the zero tolerance over its live coordinates).

    A linear programme's vertex sits where r - 1 constraints meet; the sample it
    stands for vanishes on every coordinate that came out within tolerance of
    zero (far more than r - 1 of them where a ReLU left many zeros), and the
    space's vector closest to zero on all of them is that sample, to the
    precision of the whole set. Its zeros are counted again on that vector (the
    solver's vertex is exact on its r - 1 active rows only, the others carry the
    solver's own error), and the refinement repeats while they grow. A vertex
    that is no sample (a corner of the non-negative part that the samples' hull
    does not reach) has its r - 1 zeros and, generically, no more.
    """
    q = space.basis
    c = q.T @ vertex
    tolerance = float(space.tolerance(c[:, None])[0])
    zero = (vertex.abs() <= tolerance) & live
    zero[-1] = False
    count = int(zero.sum())
    spread = math.sqrt(int(live.sum()))
    error = tolerance * spread
    if count < q.shape[1] - 1:
        return vertex, count, error
    while True:
        # Only the right singular vectors are wanted: the thin SVD skips the zeros x zeros U
        # (4000 x 4000 on a VGG head), unless fewer rows than columns leave the null row out.
        rows = q[zero]
        null = torch.linalg.svd(rows, full_matrices=rows.shape[0] < rows.shape[1])[2][-1]
        refined = q @ null
        tolerance = float(space.tolerance(null[:, None])[0])  # the refined vector's own
        if refined[-1].abs() <= tolerance:
            return vertex, count, error
        vertex = refined / refined[-1]
        error = tolerance * spread / float(refined[-1].abs())
        more = (refined.abs() <= tolerance) & live
        more[-1] = False
        if int(more.sum()) <= count:
            return vertex, count, error
        zero, count = more, int(more.sum())


def hidden_layer(model: nn.Module, classifier: nn.Module) -> tuple[str, nn.Linear] | None:
    """The linear layer whose ReLU output the classifier takes, if the model is built that way.

    Read from the modules' order (a Sequential of features registered before the
    classifier, as every victim here): walking back from the classifier over
    modules that pass their input through, a ReLU and then a linear layer with bias.
    """
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    position = next((i for i, (_, m) in enumerate(leaves) if m is classifier), None)
    if position is None:
        return None
    before = [leaf for leaf in leaves[:position] if not isinstance(leaf[1], PASS_THROUGH)]
    if len(before) < 2 or type(before[-1][1]) is not nn.ReLU:
        return None
    name, layer = before[-2]
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        return None
    return name, layer


def softmax_rows(
    embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    return torch.softmax(embeddings @ weight.T + bias, dim=1)


@dataclass(frozen=True)
class Samples:
    """Samples told apart: their embeddings [e_n, 1], probabilities and labels; and where they
    were found in the hidden layer's gradient, its inputs [a_n, 1] (None: found in the
    classifier's)."""

    embeddings: torch.Tensor  # n x (d+1), last column 1
    probabilities: torch.Tensor  # n x C
    labels: torch.Tensor  # n
    inputs: torch.Tensor | None = None  # n x (d'+1), last column 1

    @classmethod
    def labelled(cls, inputs: torch.Tensor, labels: torch.Tensor, weight, bias) -> Samples:
        """Inputs [e, 1] (rows) with their labels; their probabilities from the classifier."""
        return cls(inputs, softmax_rows(inputs[:, :-1], weight, bias), labels)

    @classmethod
    def none(cls, dim: int, num_classes: int) -> Samples:
        empty = torch.zeros(0, dim, dtype=torch.float64)
        return cls(
            empty,
            torch.zeros(0, num_classes, dtype=torch.float64),
            torch.zeros(0, dtype=torch.long),
        )

    def __len__(self) -> int:
        return self.labels.numel()

    def errors(self) -> torch.Tensor:
        """p_n - y_n: each sample's row of the classifier's output gradient (times K)."""
        onehot = nn.functional.one_hot(self.labels, self.probabilities.shape[1])
        return self.probabilities - onehot.to(self.probabilities.dtype)

    def __getitem__(self, rows) -> Samples:
        inputs = None if self.inputs is None else self.inputs[rows]
        return Samples(self.embeddings[rows], self.probabilities[rows], self.labels[rows], inputs)

    def extended(self, more: Samples) -> Samples:
        inputs = None
        if self.inputs is not None and more.inputs is not None:
            inputs = torch.cat([self.inputs, more.inputs])
        return Samples(
            torch.cat([self.embeddings, more.embeddings]),
            torch.cat([self.probabilities, more.probabilities]),
            torch.cat([self.labels, more.labels]),
            inputs,
        )


def peel(
    gradient: torch.Tensor,
    inputs: torch.Tensor,
    probabilities: torch.Tensor,
    num_images: int,
    limit: int,
    route: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which candidates are samples, with which labels: matching pursuit with exact amplitudes.

    A sample with input x_n and label c adds the known term T = (1/K) g_c x_n^T
    to the layer's gradient, where g_c is its output gradient: p_n - onehot(c)
    at the classifier, (W^T (p_n - onehot(c))) * [z_n > 0] at the hidden layer
    before it (``route`` = (W, the candidates' active units)). Nothing is
    fitted: a candidate and label qualify when the gradient's projection on
    their term is the term itself, <R, T> / ||T||^2 within one half of 1 (a
    candidate that is no sample, or a wrong label, projects near 0 or far from
    1), and the strongest qualifying term is taken out of the gradient first,
    so that the large terms no longer blur the small ones when their turn
    comes. A sample found twice does not qualify the second time: its term is
    gone. Returns the chosen candidates, their labels and the residual R.
    """
    residual = gradient.clone()
    count, num_classes = probabilities.shape
    onehots = torch.eye(num_classes, dtype=probabilities.dtype)
    if route is None:
        # ||p - onehot(c)||^2 for every candidate and class
        sizes = probabilities.square().sum(1, keepdim=True) - 2 * probabilities + 1
    else:
        weight, active = route
        through = (probabilities @ weight) * active  # n x h: the part of g_c from p
        sizes = (
            through.square().sum(1, keepdim=True)
            - 2 * through @ weight.T
            + active @ weight.square().T
        )
    terms = sizes * inputs.square().sum(1, keepdim=True) / num_images**2  # ||T||^2, n x C
    free = (terms > 0).any(dim=1)
    chosen: list[int] = []
    labels: list[int] = []
    while len(chosen) < limit:
        projected = inputs @ residual.T  # n x out: R x_n
        if route is not None:
            projected = (projected * active) @ weight.T  # n x C
        inner = ((projected * probabilities).sum(1, keepdim=True) - projected) / num_images
        ratio = inner / terms.clamp_min(torch.finfo(terms.dtype).tiny)
        # Each candidate's label is the one whose term the gradient holds most exactly.
        miss, best = (ratio - 1).abs().min(dim=1)
        qualifies = (miss <= 0.5) & free
        if not bool(qualifies.any()):
            break
        size = terms.gather(1, best[:, None]).squeeze(1)
        index = int(torch.where(qualifies, size, -1.0).argmax())
        label = int(best[index])
        error = probabilities[index] - onehots[label]
        output = error if route is None else (error @ weight) * active[index]
        residual -= torch.outer(output, inputs[index]) / num_images
        free[index] = False
        chosen.append(index)
        labels.append(label)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(labels, dtype=torch.long), residual


def fit_rest(
    residual: torch.Tensor,
    inputs: torch.Tensor,
    probabilities: torch.Tensor,
    num_images: int,
    floor: float,
    route: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates the peel left, judged together: which are samples, with which labels.

    The peel asks each term to explain itself alone, which a weakly resolved
    sample cannot while other small terms overlap it. Here the residual is
    solved for all remaining candidates' output gradients at once (least
    squares, g_n for each x_n), and a candidate is a sample with label c when
    its solved g_n is the model's own g_c to within half of g_n's size plus
    ``floor`` (the client's rounding of it). A candidate that is no sample, or
    one already taken out, spoils the solution for the others, so while some
    are inconsistent the one whose removal leaves the most consistent is
    dropped. Returns the kept candidates and their labels.
    """

    def judge(rows: torch.Tensor):
        solved = num_images * torch.linalg.lstsq(inputs[rows].T, residual.T).solution
        if route is None:
            # ||g - (p - onehot(c))||^2 = ||g - p||^2 + 2 (g - p)_c + 1
            offset = solved - probabilities[rows]
            distance = offset.square().sum(1, keepdim=True) + 2 * offset + 1
        else:
            weight, active = route
            offset = solved - (probabilities[rows] @ weight) * active[rows]
            distance = (
                offset.square().sum(1, keepdim=True)
                + 2 * (offset * active[rows]) @ weight.T
                + active[rows] @ weight.square().T
            )
        best = distance.clamp_min(0).min(dim=1)
        allowed = 0.5 * torch.linalg.vector_norm(solved, dim=1) + floor
        return best.indices, best.values.sqrt() <= allowed

    keep = torch.arange(inputs.shape[0])
    if keep.numel() == 0:
        return keep, keep
    labels, consistent = judge(keep)
    while not bool(consistent.all()) and keep.numel() > 1:
        trials = [judge(torch.cat([keep[:drop], keep[drop + 1 :]])) for drop in range(keep.numel())]
        drop = max(range(keep.numel()), key=lambda index: int(trials[index][1].sum()))
        keep = torch.cat([keep[:drop], keep[drop + 1 :]])
        labels, consistent = trials[drop]
    return keep[consistent], labels[consistent]


def identify(
    gradient: torch.Tensor,
    inputs: torch.Tensor,
    probabilities: torch.Tensor,
    num_images: int,
    limit: int,
    floor: float,
    route: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates that are samples, their labels and the gradient left after them.

    Two orders, and the one that explains more samples (then more of the
    gradient) wins: the peel first, robust to candidates that are no sample but
    misled where the samples' terms overlap strongly (an untrained model, whose
    p is near uniform for every sample), then the joint fit on what it left; or
    the joint fit first, exact when the candidates are the samples, then the
    peel on the rest.
    """
    onehots = torch.eye(probabilities.shape[1], dtype=probabilities.dtype)
    whole, whole_inputs = gradient, inputs
    if inputs.shape[1] > inputs.shape[0]:
        # Every term x_n lies in the candidates' span, and the peel and the joint fit see the
        # gradient only through its part there: in an orthonormal basis of it both are the
        # same on far fewer coordinates (a VGG head's 4097 against the candidates'). The part
        # outside is common to both orders, so their residuals still compare.
        span = torch.linalg.qr(inputs.T)[0]
        gradient, inputs = gradient @ span, inputs @ span

    def remove(residual, rows, labels):
        errors = probabilities[rows] - onehots[labels]
        outputs = errors if route is None else (errors @ route[0]) * route[1][rows]
        return residual - outputs.T @ inputs[rows] / num_images

    def restricted(rows):
        return route if route is None else (route[0], route[1][rows])

    def peel_first():
        rows, labels, residual = peel(gradient, inputs, probabilities, num_images, limit, route)
        left = remaining(rows)
        if rows.numel() < limit and left.numel():
            kept, more = fit_rest(
                residual, inputs[left], probabilities[left], num_images, floor, restricted(left)
            )
            kept, more = left[kept][: limit - rows.numel()], more[: limit - rows.numel()]
            residual = remove(residual, kept, more)
            rows, labels = torch.cat([rows, kept]), torch.cat([labels, more])
        return rows, labels, residual

    def fit_first():
        rows, labels = fit_rest(gradient, inputs, probabilities, num_images, floor, route)
        rows, labels = rows[:limit], labels[:limit]
        residual = remove(gradient, rows, labels)
        left = remaining(rows)
        if rows.numel() < limit and left.numel():
            kept, more, residual = peel(
                residual,
                inputs[left],
                probabilities[left],
                num_images,
                limit - rows.numel(),
                restricted(left),
            )
            rows, labels = torch.cat([rows, left[kept]]), torch.cat([labels, more])
        return rows, labels, residual

    def remaining(rows):
        left = torch.ones(inputs.shape[0], dtype=torch.bool)
        left[rows] = False
        return torch.nonzero(left).flatten()

    results = [peel_first(), fit_first()]
    rows, labels, _ = max(results, key=lambda result: (result[0].numel(), -float(result[2].norm())))
    inputs = whole_inputs
    return rows, labels, remove(whole, rows, labels)


def settle(
    gradient: torch.Tensor,
    inputs: torch.Tensor,
    probabilities: torch.Tensor,
    num_images: int,
    precision: float,
    route: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample the searches kept, judged again all at once against the whole gradient of
    their layer: which hold, with which labels.

    Each search judged its candidates beside samples still unknown, whose terms the peel
    and the joint fit can mistake for a candidate's (an untrained model: every g_n near
    W^T (1/C - onehot(y_n)), much alike), and a label taken is never looked at again.
    Here, with the s samples' inputs x_n known, the gradient's resolved directions
    (coordinates c_n of x_n) give K G = sum_known g_n c_n^T + sum_unknown g_m c_m^T.
    The least-squares g_n of the known ones carry the unknown samples' terms only
    inside span{g_m}, and that span is exactly the column space of what the known
    ones leave outside their own coordinates (at most K - s directions). Projected off
    it, a sample's solved g_n is its own g_c to within the gradient's noise for its
    label c and nowhere near any other label's; a candidate that is no sample, or
    one whose label the searches got wrong, is far from every g_c or near the wrong
    one. A sample holds where its best label is within ``SETTLE_MARGIN`` of the
    distance to the second; while some do not, the one furthest from it is dropped
    (it spoils the others' solution) and the rest judged again. Returns the rows kept
    and their labels (possibly other than the searches').
    """
    count, num_classes = probabilities.shape
    keep = torch.arange(count)
    labels = torch.zeros(0, dtype=torch.long)
    rank = min(num_images, *gradient.shape)
    if count == 0 or rank == 0:
        return keep[:0], labels
    space = subspace(gradient, rank, precision)
    basis = space.basis  # D x r: the resolved directions, where the samples the searches found lie
    target = num_images * gradient @ basis  # out x r
    coordinates = inputs @ basis  # n x r
    # A direction of what the known samples leave is an unknown sample's where it stands above
    # the gradient's noise as the search's directions do (times K, over out x r entries).
    threshold = (
        RESOLVED_RATIO
        * num_images
        * space.noise
        * (math.sqrt(target.shape[0]) + math.sqrt(space.rank))
    )
    while keep.numel():
        known = coordinates[keep]
        solved = torch.linalg.lstsq(known.T, target.T).solution  # s x out
        left, singular, _ = torch.linalg.svd(target - solved.T @ known, full_matrices=False)
        room = max(num_images - keep.numel(), 0)
        nuisance = left[:, : min(room, int((singular > threshold).sum()))]  # out x q
        restricted = None if route is None else (route[0], route[1][keep])
        distance = label_distances(solved, probabilities[keep], nuisance, restricted)
        nearest = distance.topk(2, dim=1, largest=False)
        best, second = nearest.values[:, 0], nearest.values[:, 1]
        labels = nearest.indices[:, 0]
        spread = best / second.clamp_min(torch.finfo(best.dtype).tiny)
        if bool((spread <= SETTLE_MARGIN).all()):
            break
        worst = int(spread.argmax())
        keep = torch.cat([keep[:worst], keep[worst + 1 :]])
    return keep, labels if keep.numel() else labels[:0]


def label_distances(solved, probabilities, nuisance, route=None) -> torch.Tensor:
    """|P (solved_n - g_n(c))| for every sample n and class c, P the projector off the
    nuisance's columns U: g_n(c) = base_n - m_nc with m_nc = onehot(c) at the classifier and
    W[c] * active_n at the hidden layer, so v = (solved_n - base_n) + m_nc and
    |P v|^2 = |v|^2 - |U^T v|^2, expanded so that no n x C x out array is formed."""
    if route is None:
        offset = solved - probabilities
        plain = offset.square().sum(1, keepdim=True) + 2 * offset + 1
        label_along = nuisance.expand(offset.shape[0], -1, -1)  # U^T onehot(c): n x C x q
    else:
        weight, active = route
        offset = solved - (probabilities @ weight) * active
        plain = (
            offset.square().sum(1, keepdim=True)
            + 2 * (offset * active) @ weight.T
            + active @ weight.square().T
        )
        label_along = torch.einsum("hq,nh,ch->ncq", nuisance, active, weight)
    along = (offset @ nuisance)[:, None, :] + label_along
    return (plain - along.square().sum(2)).clamp_min(0).sqrt()


def settled(
    samples: Samples, gradient, route, weight, num_images: int, precision: float
) -> Samples:
    """``settle`` on the layer the samples were found in: the classifier while K < C (every
    sample has its embedding there, whichever layer found it), else the hidden layer
    (``route``: what ``Decompose._hidden_route`` returned: samples, its gradient, its
    weight and bias)."""
    if len(samples) == 0:
        return samples
    if num_images < weight.shape[0]:
        rows, labels = settle(
            gradient, samples.embeddings, samples.probabilities, num_images, precision
        )
    elif route is not None and samples.inputs is not None:
        _, hidden, (hidden_weight, hidden_bias) = route
        active = (samples.inputs[:, :-1] @ hidden_weight.T + hidden_bias > 0).to(weight.dtype)
        rows, labels = settle(
            hidden, samples.inputs, samples.probabilities, num_images, precision, (weight, active)
        )
    else:
        return samples
    kept = samples[rows]
    return Samples(kept.embeddings, kept.probabilities, labels, kept.inputs)


def batch_inputs(
    gradient: torch.Tensor,
    num_images: int,
    precision: float,
    generator: torch.Generator,
    enough: int | None = None,
    known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate inputs [a_n, 1] of a linear layer, as rows, from its gradient, and the norm of
    each one's error: the vertices of the non-negative part of its resolved row space that
    have a sample's zeros, each refined to its zero pattern (at most ``enough``, besides the
    ``known`` ones). Needs non-negative inputs (a ReLU before the layer); elsewhere no
    vertex has more zeros than any vector of the space, and none come back."""
    found = simplex_vertices(subspace(gradient, num_images, precision), generator, enough, known)
    if not found:
        return gradient.new_zeros(0, gradient.shape[1]), gradient.new_zeros(0)
    return torch.stack([vector for vector, _ in found]), torch.tensor([e for _, e in found])


def search(
    gradient, samples, num_images, precision, generator, judge, enough=None, known=None
) -> tuple:
    """``ROUNDS`` rounds of candidates from a layer's gradient, each judged by ``judge(residual,
    candidate inputs, their errors, room, samples found so far, the residual's rank bound)``
    -> (new samples, residual), until
    ``enough`` new samples are found (None: all). The gradient may still hold ``known``
    samples (inputs as rows, of a search this one goes on from); it holds none of the others
    found. A sample whose vertex a round missed is still in what the samples found leave of
    the gradient, in a space with fewer others."""
    residual = gradient
    goal = num_images if enough is None else min(num_images, len(samples) + enough)
    for _ in range(ROUNDS):
        room = num_images - len(samples)
        if len(samples) >= goal:
            break
        bound = room + (0 if known is None else known.shape[0])
        inputs, errors = batch_inputs(
            residual, bound, precision, generator, goal - len(samples), known
        )
        known = None
        if inputs.shape[0] == 0:
            break
        more, residual = judge(residual, inputs, errors, room, samples, bound)
        if len(more) == 0:
            break
        samples = samples.extended(more)
    return samples, residual


def consistent_search(whole, samples, num_images, precision, weight, bias) -> tuple:
    """Samples of the classifier from the column-space consistency (``attacks.consistency``),
    besides ``samples``, and what all of them leave of the gradient (``whole``'s). Round by
    round while a round finds new ones: each searches what the samples found leave (fewer
    samples, purer rows) and polishes and checks on the gradient the call started from
    (``whole``, or what the samples given leave of it: their errors are then its noise).

    Only while the search is well determined: with r samples left, a point has r - 1 free
    coordinates and C - r equations; for 2r > C (K = 64 of 100 classes) every sample lies on
    a manifold of points that fit as well, and until the equations are 1.5 times the
    unknowns (``consistency.DETERMINED``) the points that fit lie too far from the samples.
    """
    residual = leftover(whole.gradient, samples, num_images)
    room = num_images - len(samples)
    if room == 0 or not determined(room, weight.shape[0]):
        return samples, residual
    base = whole if len(samples) == 0 else rest_of(residual, room, precision, weight, bias)
    rest, start = base, len(samples)
    while rest is not None and room > 0:
        inputs, labels = new_samples(
            base, rest, samples[start:].embeddings, weight, bias, num_images
        )
        inputs, labels = inputs[:room], labels[:room]
        if labels.numel() == 0:
            break
        samples = samples.extended(Samples.labelled(inputs, labels, weight, bias))
        residual = leftover(whole.gradient, samples, num_images)
        room = num_images - len(samples)
        if room > 0:
            rest = rest_of(residual, room, precision, weight, bias)
    return samples, residual


def rest_of(residual, room, precision, weight, bias) -> Consistency | None:
    """The consistency problem of what the samples found leave, ``room`` samples at most."""
    space = subspace(residual, room, precision)
    return Consistency.of(residual, weight, bias, space.basis, space.singular, space.noise)


def leftover(gradient, samples: Samples, num_images: int) -> torch.Tensor:
    """The classifier's gradient less the terms of the samples found."""
    return gradient - samples.errors().T @ samples.embeddings / num_images


def consistent_take(
    whole, source, embeddings, errors, found, weight, bias, num_images, room, floor
):
    """The candidate embeddings (rows [e, 1]) that are samples of the classifier, at most
    ``room`` of them, and what all samples found leave of the gradient (``whole``'s; K < C).

    Each candidate is tested by the column space of the gradient it came from (``source``:
    ``whole``, or what the samples found before leave of it, whose noise then holds their
    errors; None where nothing is resolved) with ``Consistency.fits``, each embedding known
    to within its ``errors`` (norms; None: exact). A corner of the
    vertex search that is no sample (two samples whose active units nest leave one beside
    the larger) fits with no label and is dropped; a label that alone passes is the label,
    even where the samples' terms overlap so much (probabilities far from one-hot) that the
    peel's projections would pick another. Where several labels pass (few equations,
    C - K small), the term the gradient holds decides among them (``identify``).
    """
    gradient = whole.gradient
    if source is None:
        return Samples.none(gradient.shape[1], weight.shape[0]), leftover(
            gradient, found, num_images
        )
    classes, passing = source.fits(embeddings, weight, bias, num_images, errors)
    chosen = classes.gather(1, passing.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
    decided = torch.nonzero(passing.sum(1) == 1).flatten()
    inputs, labels = accepted(
        whole, embeddings[decided], chosen[decided], found.embeddings, weight, bias, num_images
    )
    more = Samples.labelled(inputs, labels, weight, bias)[:room]
    residual = leftover(gradient, found.extended(more), num_images)
    ambiguous = torch.nonzero(passing.sum(1) > 1).flatten()
    if ambiguous.numel() and len(more) < room:
        candidates = embeddings[ambiguous]
        rows, labels, _ = identify(
            residual,
            candidates,
            softmax_rows(candidates[:, :-1], weight, bias),
            num_images,
            room - len(more),
            floor,
        )
        allowed = ((classes[ambiguous][rows] == labels[:, None]) & passing[ambiguous][rows]).any(1)
        inputs, labels = accepted(
            whole,
            candidates[rows[allowed]],
            labels[allowed],
            found.extended(more).embeddings,
            weight,
            bias,
            num_images,
        )
        more = more.extended(Samples.labelled(inputs, labels, weight, bias))
        residual = leftover(gradient, found.extended(more), num_images)
    return more, residual


@register_attack("decompose")
class Decompose:
    """Per-sample labels from the gradient's rank-one terms; iLRG for the samples it cannot separate."""

    restores_counts = True
    #: the hidden layer's gradient is read from ``SharedGradients.parameter_grads``
    needs_parameter_grads = True

    def __init__(self, layer_name: str | None = None, fallback: ILRG | None = None, seed: int = 0):
        self.layer_name = layer_name
        self.fallback = fallback or ILRG()
        self.seed = seed

    @classmethod
    def from_options(
        cls,
        layer_name: str | None = None,
        alpha: float = 1.0,
        norm_guard: float = 3.0,
        seed: int = 0,
        **_,
    ):
        return cls(layer_name, ILRG(alpha=alpha, norm_guard=norm_guard), seed)

    def __call__(self, shared: SharedGradients) -> Restoration:
        with one_cpu_thread(shared.bias_grad.device):
            return self._restore(shared)

    def _restore(self, shared: SharedGradients) -> Restoration:
        num_images, num_classes = shared.num_images, shared.num_classes
        # The programmes' directions are random; seeded per call: one gradient, one answer.
        generator = torch.Generator().manual_seed(self.seed)
        precision = rounding_of(shared.weight_grad)
        gradient = stacked(shared.weight_grad, shared.bias_grad)
        weight, bias = (t.detach().to("cpu", torch.float64) for t in (shared.weight, shared.bias))
        samples = Samples.none(gradient.shape[1], num_classes)
        if not bool(torch.isfinite(gradient).all()):
            return self._complete(shared, samples)
        # The client rounds each error row p_n - y_n to its precision: one unit at 1 per class
        # (p_y = 1 - 1e-9 is 1 in float32).
        floor = 2 * precision * math.sqrt(num_classes)
        residual = gradient
        whole = None
        if num_images < num_classes:
            # Every candidate embedding must also fit the column space (C - K equations):
            # a corner of the vertex search that is no sample does not.
            whole = rest_of(gradient, num_images, precision, weight, bias)
        # The column space tests a candidate embedding with C - K equations: where they are
        # few against the samples (FCN-3 at K = 8 of 10 classes: 2), a confident sample's
        # roughly resolved vertex fails them or passes with several labels, and the peel's
        # exact terms judge better (measured: 7.6 of 8 separated against 6.4).
        tested = whole is not None and num_classes - num_images >= TESTED * num_images
        # (whole, source, embeddings, their errors, samples found, room) -> (new, residual)
        take = partial(
            consistent_take, weight=weight, bias=bias, num_images=num_images, floor=floor
        )
        if whole is not None:
            # The classifier's own gradient has rank K only while K < C. The samples whose
            # output gradient the column space holds (any embedding, dense or not, and cheap;
            # while the search is determined), then the vertices (inputs with zeros).
            samples, residual = consistent_search(
                whole, samples, num_images, precision, weight, bias
            )
            samples, residual = self._vertices(
                whole,
                take if tested else None,
                samples,
                residual,
                (weight, bias, num_images, precision),
                generator,
                floor,
            )
        # While K < C a sample the classifier's residual no longer resolves is below every
        # layer's noise (its term in the hidden layer is W^T g_n times its input, as small).
        room = num_images - len(samples)
        spent = whole is not None and room > 0 and subspace(residual, room, precision).rank == 0
        route = None
        if len(samples) < num_images and not spent:
            route = self._hidden_route(shared, precision, generator, weight, bias, floor)
            hidden = None if route is None else route[0]
            if hidden is not None and tested:
                # Judged on the classifier: a sample found there already does not count twice.
                more, residual = take(whole, whole, hidden.embeddings, None, samples, room=room)
                samples = samples.extended(more)
            elif hidden is not None and whole is not None:
                more, residual = self._take(
                    residual, hidden.embeddings, weight, bias, num_images, room, floor
                )
                samples = samples.extended(more)
            elif hidden is not None:
                samples = hidden
        return self._complete(
            shared, settled(samples, gradient, route, weight, num_images, precision)
        )

    def _vertices(self, whole, take, samples, residual, classifier, generator, floor) -> tuple:
        """The samples among the vertices of the classifier's row space, besides ``samples``,
        judged by the column space where it has the equations for it (``take``, a
        ``consistent_take`` with the classifier bound; None: not enough equations), by the
        peel and the joint fit elsewhere; and what all of them leave of the gradient.
        ``classifier``: (its weight, bias, the batch size K, the gradient's precision).

        A programme per vertex costs far more than the column-space search: where the
        candidates are tested, the vertices run only until what is left is well determined,
        then that search, then the rest of the vertices (of the same space: what the samples
        found so far leave can be tilted by a sample below the noise, and its corners are
        then no samples).
        """
        gradient, (weight, bias, num_images, precision) = whole.gradient, classifier
        num_classes = weight.shape[0]

        def judge(rest, embeddings, errors, room, found, bound):
            if take is None:
                return self._take(rest, embeddings, weight, bias, num_images, room, floor)
            source = whole if rest is gradient else rest_of(rest, bound, precision, weight, bias)
            return take(whole, source, embeddings, errors, found, room=room)

        first = num_images - len(samples) - most_determined(num_classes) if take else 0
        polytope, before = residual, len(samples)
        for enough in [first] * (first > 0) + [None]:
            if len(samples) == num_images:
                break
            known = samples[before:].embeddings if len(samples) > before else None
            samples, residual = search(
                polytope, samples, num_images, precision, generator, judge, enough, known
            )
            samples, residual = consistent_search(
                whole, samples, num_images, precision, weight, bias
            )
        return samples, residual

    @staticmethod
    def _take(
        residual, embeddings, weight, bias, num_images, limit, floor
    ) -> tuple[Samples, torch.Tensor]:
        """The candidate embeddings that are samples, taken out of the classifier's gradient."""
        probabilities = softmax_rows(embeddings[:, :-1], weight, bias)
        rows, labels, residual = identify(
            residual, embeddings, probabilities, num_images, limit, floor
        )
        return Samples(embeddings[rows], probabilities[rows], labels), residual

    def _hidden_route(self, shared, precision, generator, weight, bias, floor) -> tuple | None:
        """Samples through the hidden layer before the classifier: candidate inputs from its
        gradient, the layer and its ReLU run on them, and the peel in its gradient (rank K
        up to its width, where the classifier's stops at C - 1)."""
        if shared.model is None or shared.parameter_grads is None:
            return None
        _, classifier = last_linear_layer(shared.model, self.layer_name)
        found = hidden_layer(shared.model, classifier)
        if found is None:
            return None
        name, layer = found
        grads = shared.parameter_grads
        if f"{name}.weight" not in grads or f"{name}.bias" not in grads:
            return None
        hidden = stacked(grads[f"{name}.weight"], grads[f"{name}.bias"])
        if not bool(torch.isfinite(hidden).all()):
            return None
        hidden_weight = layer.weight.detach().to("cpu", torch.float64)
        hidden_bias = layer.bias.detach().to("cpu", torch.float64)
        # The hidden layer's g is W^T (p - y) on the active units: the client's rounding of
        # p - y reaches it stretched by at most W's norm.
        stretch = float(torch.linalg.matrix_norm(weight, ord=2))

        def judge(rest, inputs, _errors, room, _found, _bound):
            pre = inputs[:, :-1] @ hidden_weight.T + hidden_bias
            active = (pre > 0).to(pre.dtype)
            outputs = pre * active
            embeddings = torch.cat([outputs, outputs.new_ones(outputs.shape[0], 1)], 1)
            probabilities = softmax_rows(outputs, weight, bias)
            rows, labels, rest = identify(
                rest,
                inputs,
                probabilities,
                shared.num_images,
                room,
                floor * stretch,
                (weight, active),
            )
            return Samples(embeddings[rows], probabilities[rows], labels, inputs[rows]), rest

        none = Samples.none(weight.shape[1] + 1, weight.shape[0])
        empty = Samples(
            none.embeddings, none.probabilities, none.labels, hidden.new_zeros(0, hidden.shape[1])
        )
        found = search(hidden, empty, shared.num_images, precision, generator, judge)[0]
        return found, hidden, (hidden_weight, hidden_bias)

    def _complete(self, shared, samples: Samples) -> Restoration:
        """iLRG's counts on the whole gradient, raised where the separated samples prove more
        of a class than it gives (the excess taken where its own estimate supports it least).

        The separated samples' labels are what the gradient proves; the rest of the batch
        is counted by iLRG's estimate of the whole batch's softmax sum, which holds the
        separated samples' p_n too (K grad_b = sum_n p_n - k is exact, and iLRG differs
        only in how it estimates the sum). Running iLRG again on what the separated
        samples leave was tried and measured: on the gradient less a few terms its class
        embeddings move and its counts could lose to the plain answer (an MLP's batches of
        32 mid-training: worse than iLRG on 9 of 50), where this is below iLRG's K labels
        on 1 of 50 and on none of the 90 trained-victim batches measured (README).
        """
        device = shared.bias_grad.device
        # iLRG solved once: its rounded counts, its K labels and the raw estimate that orders
        # the surplus all come from the same solve.
        raw, unknowns, _ = self.fallback.solve(shared)
        estimate = round_counts(raw, shared.num_images)
        adjusted = adjust_to_total(raw, estimate, shared.num_images, eligible=unknowns)
        if len(samples) == 0:
            return Restoration.from_counts(
                estimate, adjusted, sample_labels=samples.labels.to(device)
            )
        proven = torch.bincount(samples.labels, minlength=shared.num_classes)
        counts = proven_counts(raw.cpu(), adjusted.cpu(), proven, shared.num_images)
        counts = counts.to(device)
        return Restoration.from_counts(counts, counts, sample_labels=samples.labels.to(device))


def proven_counts(
    raw: torch.Tensor, estimate: torch.Tensor, proven: torch.Tensor, num_images: int
) -> torch.Tensor:
    """iLRG's counts ``estimate`` (rounded from its real-valued ``raw``) raised to at least
    ``proven`` in every class; what that adds beyond K (or beyond the estimate's own total,
    where rounding put it above K) is taken back one at a time from the classes above their
    proven count whose last unit ``raw`` supports least, and a total short of K is made up
    where ``raw`` was rounded down most (``ilrg.adjust_to_total``)."""
    counts = torch.maximum(estimate, proven)
    raw = raw.to(torch.float64)
    for _ in range(int(counts.sum()) - num_images):
        support = torch.where(counts > proven, raw - counts, math.inf)
        counts[int(support.argmin())] -= 1
    if int(counts.sum()) < num_images:
        counts = adjust_to_total(raw, counts, num_images)
    return counts


def stacked(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """[grad_W, grad_b] in float64 on the CPU: the small dense algebra of this attack."""
    return torch.cat(
        [
            weight_grad.detach().to("cpu", torch.float64),
            bias_grad.detach().to("cpu", torch.float64)[:, None],
        ],
        dim=1,
    )
