"""Super token attention, dense and slow, in the paper's matrix notation (Sec. 3.2).

Shapes: B images, C channels, N tokens (pixels of the padded map, row-major), M super tokens
(cells of the grid, row-major), each cell h × w tokens.

    X ∈ R^{N×C}                      tokens
    S⁰ = cell averages of X          initial super tokens            (initial_super_tokens)
    A  = softmax over 3×3 neighbours of X Sᵀ / √C   ∈ R^{N×M}        (association)
    S  = (Aᵀ X) / (Aᵀ 1)             column-normalised update        (update_super_tokens)
    S' = MHSA(S)                                                     (mhsa)
    Y  = A S'                        back to tokens                  (upsample)

A is zero outside each token's 3×3 neighbourhood of cells. As in the authors' code, the
association is treated as a constant for gradients, the input is zero-padded on the right and
bottom to a multiple of the cell size (padded tokens take part), and a neighbour cell outside
the grid is a zero vector that still takes a share exp(0) of the softmax. A 1×1 cell means
plain multi-head self-attention over all tokens.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

EPS = 1e-12


def _cell_size(stoken_size) -> tuple[int, int]:
    return (stoken_size, stoken_size) if np.isscalar(stoken_size) else tuple(stoken_size)


def pad_to_grid(x: np.ndarray, stoken_size) -> np.ndarray:
    """Zero-pad (B, C, H, W) on the right/bottom so H and W are multiples of the cell size."""
    h, w = _cell_size(stoken_size)
    H, W = x.shape[-2:]
    return np.pad(x, ((0, 0), (0, 0), (0, -H % h), (0, -W % w)))


def tokens(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> X, (B, N, C)."""
    return rearrange(x, "b c y x -> b (y x) c")


def cell_of_token(H: int, W: int, stoken_size) -> np.ndarray:
    """(N, 2) grid coordinates (row, col) of the cell each token of an H × W map falls in."""
    h, w = _cell_size(stoken_size)
    rows, cols = np.meshgrid(np.arange(H) // h, np.arange(W) // w, indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def neighbourhood(H: int, W: int, stoken_size) -> tuple[np.ndarray, np.ndarray]:
    """Mask (N, M): token i may associate with super token j (j in the 3×3 cells around i's cell);
    and, per token, how many of its 9 neighbour slots fall outside the grid (phantom slots)."""
    h, w = _cell_size(stoken_size)
    gh, gw = H // h, W // w
    tok = cell_of_token(H, W, stoken_size)                      # (N, 2)
    sup = cell_of_token(gh, gw, 1)                              # (M, 2): cell coordinates
    dist = np.abs(tok[:, None, :] - sup[None, :, :]).max(-1)    # Chebyshev distance in cells
    mask = dist <= 1
    phantoms = 9 - mask.sum(1)
    return mask, phantoms


def initial_super_tokens(x: np.ndarray, stoken_size) -> np.ndarray:
    """S⁰: the average of the tokens in each cell of a (padded) map, (B, M, C)."""
    h, w = _cell_size(stoken_size)
    return rearrange(x, "b c (gy h) (gx w) -> b (gy gx) (h w) c", h=h, w=w).mean(2)


def association(X: np.ndarray, S: np.ndarray, H: int, W: int, stoken_size) -> np.ndarray:
    """A (B, N, M): softmax of X Sᵀ/√C over each token's 9 neighbour slots; zero elsewhere.

    Phantom slots (neighbours outside the grid) are zero vectors: logit 0, weight exp(0)
    in the denominator, and no column of their own.
    """
    C = X.shape[-1]
    mask, phantoms = neighbourhood(H, W, stoken_size)
    logits = np.einsum("bnc,bmc->bnm", X, S) / np.sqrt(C)
    logits = np.where(mask, logits, -np.inf)
    shift = np.maximum(logits.max(-1, keepdims=True), 0.0)     # for stability; includes phantoms' 0
    e = np.exp(logits - shift)
    return e / (e.sum(-1, keepdims=True) + phantoms[:, None] * np.exp(-shift))


def update_super_tokens(X: np.ndarray, A: np.ndarray) -> np.ndarray:
    """S = (Aᵀ X) / (Aᵀ 1): each super token is the association-weighted mean of its tokens."""
    return np.einsum("bnm,bnc->bmc", A, X) / (A.sum(1)[..., None] + EPS)


def mhsa(S: np.ndarray, params: dict, num_heads: int) -> np.ndarray:
    """Multi-head self-attention over the rows of S (B, M, C) with 1×1-conv weights.

    The qkv projection's 3C output channels are grouped per head as [q, k, v].
    """
    C = S.shape[-1]
    d = C // num_heads
    qkv = S @ params["qkv.weight"].reshape(3 * C, C).T
    if params.get("qkv.bias") is not None:
        qkv = qkv + params["qkv.bias"]
    q, k, v = rearrange(qkv, "b m (h three d) -> three b h m d", h=num_heads, three=3)
    scores = q @ rearrange(k, "b h m d -> b h d m") / np.sqrt(d)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    attn = scores / scores.sum(-1, keepdims=True)
    out = rearrange(attn @ v, "b h m d -> b m (h d)")
    return out @ params["proj.weight"].reshape(C, C).T + params["proj.bias"]


def upsample(A: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Y = A S: every token gathers the super tokens it is associated with."""
    return A @ S


def super_token_association(x: np.ndarray, stoken_size, n_iter: int) -> np.ndarray:
    """The association after ``n_iter`` sampling iterations, (B, N, M) over the padded map."""
    xp = pad_to_grid(x, stoken_size)
    H, W = xp.shape[-2:]
    X, S = tokens(xp), initial_super_tokens(xp, stoken_size)
    for i in range(n_iter):
        A = association(X, S, H, W, stoken_size)
        if i < n_iter - 1:
            S = update_super_tokens(X, A)
    return A


def super_token_attention(x: np.ndarray, params: dict, stoken_size, n_iter: int, num_heads: int,
                          association_matrix: np.ndarray | None = None) -> np.ndarray:
    """STA(x) for (B, C, H, W) ``x``; returns an array of x's shape.

    ``params`` holds the sub-keys of a block's ``attn.stoken_refine``: ``qkv.weight``
    (3C, C, 1, 1), ``qkv.bias``, ``proj.weight`` (C, C, 1, 1), ``proj.bias``.
    ``association_matrix`` fixes A (e.g. to differentiate with A held constant, as the authors'
    code computes A without gradient); by default it is computed from ``x``.
    """
    params = {k: np.asarray(v) for k, v in params.items()}
    B, C, H0, W0 = x.shape
    if _cell_size(stoken_size) == (1, 1):
        out = mhsa(tokens(x), params, num_heads)
        return rearrange(out, "b (y x) c -> b c y x", y=H0)
    xp = pad_to_grid(x, stoken_size)
    H, W = xp.shape[-2:]
    X = tokens(xp)
    A = super_token_association(x, stoken_size, n_iter) if association_matrix is None else association_matrix
    S = mhsa(update_super_tokens(X, A), params, num_heads)
    Y = rearrange(upsample(A, S), "b (y x) c -> b c y x", y=H)
    return Y[:, :, :H0, :W0]
