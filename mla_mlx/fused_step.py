"""The whole absorbed decoding step of an MLA model as one hand-written kernel (MLX's CUDA backend).

The compiled fixed-shape step (static_decode) is ~25 MLX operations a decoder layer, each a kernel launched and
recorded by the host: at batch 4 that host work, not the ~30 MB a step reads, sets the time. This kernel does
every layer of one position in one launch, one thread block per batch row: the small models here fit a row's
activations in shared memory (the widest is the cross-attention's scores, heads x encoder tokens), and the
weights are read by every block from L2. The math is that of StaticDecoder._step (the absorbed projections,
layer norm, softmax, exact GELU), in float32; only the order of the sums differs from MLX's matmuls.

The kernel's body is plain C++ apart from a few macros (DEV, SYNC and the thread indices), so the tests also build
it for the host with one thread per block and check its tokens against the eager step there.
"""

from __future__ import annotations

import mlx.core as mx

from .attention import on_cuda_backend

# Per decoder layer, the order of the packed float32 weights (input-major: x @ w, so that threads computing
# neighbouring outputs read neighbouring addresses). Sizes use the kernel's constants.
LAYOUT = (
    ("norm1_w", "D"), ("norm1_b", "D"),
    ("w_a", "D*A"),  # q_a_proj | kv_a_proj
    ("q_a_norm_w", "QR"), ("q_a_norm_b", "QR"),
    ("kv_a_norm_w", "R"), ("kv_a_norm_b", "R"),
    ("self_q", "QR*SQ"),  # the absorbed query: per head [latent R | rotary PE]
    ("self_o", "SO*D"),
    ("norm2_w", "D"), ("norm2_b", "D"),
    ("cross_q", "D*CQ"),
    ("cross_o", "CQ*D"),
    ("norm3_w", "D"), ("norm3_b", "D"),
    ("fc1_w", "D*F"), ("fc1_b", "F"),
    ("fc2_w", "F*D"), ("fc2_b", "D"),
)  # fmt: skip

HEADER = r"""
#ifndef DEV
#define DEV __device__
#define SYNC() __syncthreads()
#endif

// Layer norm of v[0:n] into out (may be v itself): every thread computes the same mean and variance (n is a few
// hundred at most, fewer barriers than a tree), then writes its share.
DEV void block_layer_norm(const float* v, float* out, int n, const float* w, const float* b, float eps, int tid,
                          int nt) {
  float mean = 0.0f;
  for (int i = 0; i < n; i++) mean += v[i];
  mean /= n;
  float var = 0.0f;
  for (int i = 0; i < n; i++) {
    float d = v[i] - mean;
    var += d * d;
  }
  var /= n;
  float inv = 1.0f / sqrtf(var + eps);
  SYNC();
  for (int i = tid; i < n; i += nt) out[i] = (v[i] - mean) * inv * w[i] + b[i];
}

// out[g*m + j] = (add ? out : 0) + (bias ? bias[j] : 0) + sum_k in[g*in_stride + k] * w[g*w_stride + k*ld + j]
// for g < G groups (heads), j < m. The sum over k is split in S parts when there are fewer outputs than threads;
// the parts are added in a fixed order, so every run gives the same bits.
DEV void block_matvec(const float* in, int in_stride, const float* w, int ld, int w_stride, const float* bias,
                      float* out, int k_len, int m, int groups, bool add, float* part, int tid, int nt) {
  int items = groups * m;
  int splits = nt / items;
  if (splits < 1) splits = 1;
  if (splits > k_len) splits = k_len;
  int chunk = (k_len + splits - 1) / splits;
  for (int i = tid; i < splits * items; i += nt) {
    int s = i / items, gj = i % items, g = gj / m, j = gj % m;
    const float* x = in + g * in_stride;
    const float* col = w + (size_t)g * w_stride + j;
    int end = (s + 1) * chunk < k_len ? (s + 1) * chunk : k_len;
    float acc = 0.0f;
#pragma unroll 8
    for (int k = s * chunk; k < end; k++) acc += x[k] * col[(size_t)k * ld];
    if (splits == 1) {
      out[i] = (add ? out[i] : 0.0f) + (bias ? bias[j] : 0.0f) + acc;
    } else {
      part[i] = acc;
    }
  }
  if (splits == 1) return;
  SYNC();
  for (int i = tid; i < items; i += nt) {
    float acc = 0.0f;
    for (int s = 0; s < splits; s++) acc += part[s * items + i];
    out[i] = (add ? out[i] : 0.0f) + (bias ? bias[i % m] : 0.0f) + acc;
  }
}

// In place, each of the G rows of scores [G, n]: softmax. part holds 2 * NT floats (NT >= nt, G).
DEV void block_softmax(float* scores, int groups, int n, float* part, int half, int tid, int nt) {
  float* row = part + half;  // per row: its max, then 1 / its sum
  int splits = nt / groups;
  if (splits < 1) splits = 1;
  if (splits > n) splits = n;
  int chunk = (n + splits - 1) / splits;
  for (int i = tid; i < groups * splits; i += nt) {
    int g = i / splits, k = i % splits, end = (k + 1) * chunk < n ? (k + 1) * chunk : n;
    float m = -3.402823466e38f;
    for (int j = k * chunk; j < end; j++) m = fmaxf(m, scores[g * n + j]);
    part[i] = m;
  }
  SYNC();
  for (int g = tid; g < groups; g += nt) {
    float m = -3.402823466e38f;
    for (int k = 0; k < splits; k++) m = fmaxf(m, part[g * splits + k]);
    row[g] = m;
  }
  SYNC();
  for (int i = tid; i < groups * n; i += nt) scores[i] = expf(scores[i] - row[i / n]);
  SYNC();
  for (int i = tid; i < groups * splits; i += nt) {
    int g = i / splits, k = i % splits, end = (k + 1) * chunk < n ? (k + 1) * chunk : n;
    float sum = 0.0f;
    for (int j = k * chunk; j < end; j++) sum += scores[g * n + j];
    part[i] = sum;
  }
  SYNC();
  for (int g = tid; g < groups; g += nt) {
    float sum = 0.0f;
    for (int k = 0; k < splits; k++) sum += part[g * splits + k];
    row[g] = 1.0f / sum;
  }
  SYNC();
  for (int i = tid; i < groups * n; i += nt) scores[i] *= row[i / n];
}
"""


# The kernel's body. Constants (template arguments): D model width, H heads, R latent rank, PE rotary width, QR
# query rank, CR cross-attention rank, N encoder tokens, F MLP width, L cache length, V vocabulary, NL decoder
# layers, B batch, NT threads a block, FINAL whether a final norm comes before the head; PAD_ and FINISH_ tokens.
SOURCE = r"""
  constexpr int A = QR + R + PE, W = R + PE, SQ = H * W, SO = H * R, CQ = H * CR;
  constexpr int SC = H * (N > L ? N : L), O = SO > CQ ? SO : CQ;
  constexpr int P_N1 = 0, P_WA = 2 * D, P_QN = P_WA + D * A, P_KN = P_QN + 2 * QR, P_SQ = P_KN + 2 * R;
  constexpr int P_SO = P_SQ + QR * SQ, P_N2 = P_SO + SO * D, P_CQ = P_N2 + 2 * D, P_CO = P_CQ + D * CQ;
  constexpr int P_N3 = P_CO + CQ * D, P_F1 = P_N3 + 2 * D, P_F1B = P_F1 + D * F, P_F2 = P_F1B + F;
  constexpr int P_F2B = P_F2 + F * D, P = P_F2B + D;
  THREAD_INDEX
  float* x = smem;       // the residual stream
  float* xn = x + D;     // its norm
  float* a = xn + D;     // q_a | c | k_pe
  float* kv = a + A;     // this position's cache row: norm(c) | rotated k_pe
  float* qn = kv + W;    // norm(q_a)
  float* q = qn + QR;    // self-attention queries, per head [latent | rotary]
  float* sc = q + SQ;    // scores, per head
  float* o = sc + SC;    // attended latents, per head
  float* cq = o + O;     // cross-attention queries
  float* hid = cq + CQ;  // the MLP's hidden layer
  float* part = hid + F; // 2 * NT floats of partial sums
  const float eps_ = eps[0];
  const int p = position[0];
  const float* rot = rotation + (size_t)p * PE * PE;
  const int tok = tokens[row * L + p];
  for (int i = tid; i < D; i += nt) x[i] = embed[tok * D + i];
  for (int i = tid; i < NL * L * W; i += nt) {  // the output cache: this row's caches as they were
    int l = i / (L * W), j = i % (L * W);
    cache_out[((size_t)l * B + row) * L * W + j] = cache[((size_t)l * B + row) * L * W + j];
  }
  SYNC();
  for (int l = 0; l < NL; l++) {
    const float* w = weights + (size_t)l * P;
    const float* mem = memory + ((size_t)l * B + row) * N * CR;
    float* keys = cache_out + ((size_t)l * B + row) * L * W;
    // Self-attention, absorbed.
    block_layer_norm(x, xn, D, w + P_N1, w + P_N1 + D, eps_, tid, nt);
    SYNC();
    block_matvec(xn, 0, w + P_WA, A, 0, nullptr, a, D, A, 1, false, part, tid, nt);
    SYNC();
    block_layer_norm(a, qn, QR, w + P_QN, w + P_QN + QR, eps_, tid, nt);
    block_layer_norm(a + QR, kv, R, w + P_KN, w + P_KN + R, eps_, tid, nt);
    for (int j = tid; j < PE; j += nt) {
      float acc = 0.0f;
      for (int i = 0; i < PE; i++) acc += a[QR + R + i] * rot[i * PE + j];
      kv[R + j] = acc;
    }
    SYNC();
    for (int i = tid; i < W; i += nt) keys[p * W + i] = kv[i];
    block_matvec(qn, 0, w + P_SQ, SQ, 0, nullptr, q, QR, SQ, 1, false, part, tid, nt);
    SYNC();
    for (int h = tid; h < H; h += nt) {
      float t[PE];
      for (int j = 0; j < PE; j++) {
        float acc = 0.0f;
        for (int i = 0; i < PE; i++) acc += q[h * W + R + i] * rot[i * PE + j];
        t[j] = acc;
      }
      for (int j = 0; j < PE; j++) q[h * W + R + j] = t[j];
    }
    SYNC();  // also: this block's write of cache row p is seen by all its threads
    const int len = p + 1;
    for (int j = tid; j < len; j += nt) {
      const float* k = keys + j * W;  // re-read per head from L1: an array of W floats costs W registers
#pragma unroll 1
      for (int h = 0; h < H; h++) {
        float acc = 0.0f;
        for (int c = 0; c < W; c++) acc += q[h * W + c] * k[c];
        sc[h * len + j] = acc;
      }
    }
    SYNC();
    block_softmax(sc, H, len, part, NT, tid, nt);
    SYNC();
    block_matvec(sc, len, keys, W, 0, nullptr, o, len, R, H, false, part, tid, nt);
    SYNC();
    block_matvec(o, 0, w + P_SO, D, 0, nullptr, x, SO, D, 1, true, part, tid, nt);
    SYNC();
    // Cross-attention over the latent memory.
    block_layer_norm(x, xn, D, w + P_N2, w + P_N2 + D, eps_, tid, nt);
    SYNC();
    block_matvec(xn, 0, w + P_CQ, CQ, 0, nullptr, cq, D, CQ, 1, false, part, tid, nt);
    SYNC();
    for (int j = tid; j < N; j += nt) {
      const float* m = mem + j * CR;
#pragma unroll 1
      for (int h = 0; h < H; h++) {
        float acc = 0.0f;
        for (int c = 0; c < CR; c++) acc += cq[h * CR + c] * m[c];
        sc[h * N + j] = acc;
      }
    }
    SYNC();
    block_softmax(sc, H, N, part, NT, tid, nt);
    SYNC();
    block_matvec(sc, N, mem, CR, 0, nullptr, o, N, CR, H, false, part, tid, nt);
    SYNC();
    block_matvec(o, 0, w + P_CO, D, 0, nullptr, x, CQ, D, 1, true, part, tid, nt);
    SYNC();
    // MLP.
    block_layer_norm(x, xn, D, w + P_N3, w + P_N3 + D, eps_, tid, nt);
    SYNC();
    block_matvec(xn, 0, w + P_F1, F, 0, w + P_F1B, hid, D, F, 1, false, part, tid, nt);
    SYNC();
    for (int i = tid; i < F; i += nt) hid[i] = 0.5f * hid[i] * (1.0f + erff(hid[i] * 0.70710678118654752f));
    SYNC();
    block_matvec(hid, 0, w + P_F2, D, 0, w + P_F2B, x, F, D, 1, true, part, tid, nt);
    SYNC();
  }
  if (FINAL) {
    block_layer_norm(x, xn, D, final_norm, final_norm + D, eps_, tid, nt);
  } else {
    for (int i = tid; i < D; i += nt) xn[i] = x[i];
  }
  SYNC();
  block_matvec(xn, 0, head_w, V, 0, head_b, sc, D, V, 1, false, part, tid, nt);
  SYNC();
  int best = 0;  // every thread finds the same greedy token (the first of equal maxima, as argmax)
  for (int v = 1; v < V; v++) if (sc[v] > sc[best]) best = v;
  const bool done = finished[row] != 0;
  const int nxt = done ? PAD_ : best;
  for (int i = tid; i < L; i += nt) tokens_out[row * L + i] = (i == p + 1) ? nxt : tokens[row * L + i];
  if (tid == 0) finished_out[row] = (done || nxt == FINISH_) ? 1 : 0;
  if (tid == 0 && row == 0) position_out[0] = p + 1;
"""

PACKED = ("weights", "memory", "rotation", "embed", "head_w", "head_b", "final_norm", "eps")  # pack()'s
INPUTS = PACKED + ("cache", "tokens", "finished", "position")  # the state each step reads
OUTPUTS = ("cache_out", "tokens_out", "finished_out", "position_out")
# generate's default takes this step up to this many rows: each block reads all the layer weights for its row,
# so past some batch the compiled step's matmuls, which read them once, win: on an H200 the seed step is 4.8 ms
# fused against 12.4 compiled at batch 256, 17.9 against 11.9 at 1,024 (docs/benchmarks.md has the rows).
AUTO_MAX_BATCH = 512
THREADS = 256  # 512 would need <= 128 registers a thread; the kernel takes ~170


def constants(cfg, batch: int, max_length: int, final: bool) -> dict:
    """The kernel's compile-time sizes for this model and batch."""
    from mnist_grid.tokens import FINISH, PAD

    return dict(
        D=cfg.d_model, H=cfg.heads, R=cfg.dec_kv_rank, PE=cfg.rope_dim, QR=cfg.dec_q_rank, CR=cfg.cross_kv_rank,
        N=cfg.enc_tokens, F=cfg.d_model * cfg.mlp_ratio, L=max_length, V=cfg.vocab, NL=cfg.dec_layers, B=batch,
        NT=THREADS, FINAL=int(final), PAD_=PAD, FINISH_=FINISH,
    )  # fmt: skip


def shared_floats(k: dict) -> int:
    """Floats of shared memory a block uses: the buffers SOURCE lays out, in its order."""
    a, w = k["QR"] + k["R"] + k["PE"], k["R"] + k["PE"]
    sc = k["H"] * max(k["N"], k["L"])
    o = max(k["H"] * k["R"], k["H"] * k["CR"])
    return 2 * k["D"] + a + w + k["QR"] + k["H"] * w + sc + o + k["H"] * k["CR"] + k["F"] + 2 * k["NT"]


def layer_floats(k: dict) -> int:
    """Packed weights of one decoder layer (LAYOUT)."""
    a, sq = k["QR"] + k["R"] + k["PE"], k["H"] * (k["R"] + k["PE"])
    so, cq, d, f = k["H"] * k["R"], k["H"] * k["CR"], k["D"], k["F"]
    return (
        2 * d + d * a + 2 * k["QR"] + 2 * k["R"] + k["QR"] * sq + so * d + 2 * d + d * cq + cq * d + 2 * d
        + d * f + f + f * d + d
    )  # fmt: skip


CUDA_INDEX = "extern __shared__ float smem[];\n  const int tid = threadIdx.x, nt = NT, row = blockIdx.x;"
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a block may have on the cards MLX's CUDA backend supports


def available() -> str | None:
    """Why the fused step cannot run here, or None: it is a CUDA kernel, for MLX's CUDA backend."""
    if not on_cuda_backend():
        return "the fused step is a CUDA kernel: it runs on MLX's CUDA backend only"
    return None


def blocker(model, batch: int, max_length: int) -> str | None:
    """Why the fused step cannot decode this model at this size here, or None."""
    reason = available()
    if reason is None and model.head.weight.dtype != mx.float32:
        reason = f"the fused step computes in float32; this model is {model.head.weight.dtype}"
    if reason is None:
        k = constants(model.config, batch, max_length, model.decoder_norm is not None)
        if 4 * shared_floats(k) > SMEM_LIMIT:
            reason = f"the fused step needs {4 * shared_floats(k)} bytes of shared memory a row, more than {SMEM_LIMIT}"
    return reason


class FusedStep:
    """The kernel for one model config, batch and cache length; call() runs one position for every row."""

    def __init__(self, cfg, batch: int, max_length: int, final: bool):
        self.k = constants(cfg, batch, max_length, final)
        self.shared_bytes = 4 * shared_floats(self.k)
        self.kernel = mx.fast.cuda_kernel(
            name="mla_fused_decode_step",
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            header=HEADER,
            source=SOURCE.replace("THREAD_INDEX", CUDA_INDEX),
            shared_memory=self.shared_bytes,
        )
        k = self.k
        self.outputs = dict(
            output_shapes=[(k["NL"], batch, max_length, k["R"] + k["PE"]), (batch, max_length), (batch,), (1,)],
            output_dtypes=[mx.float32, mx.int32, mx.int32, mx.int32],
        )

    def __call__(self, packed: dict, cache, tokens, finished, position):
        """packed: pack()'s arrays. Returns the new (cache, tokens, finished, position)."""
        k = self.k
        inputs = [packed[name] for name in PACKED] + [cache, tokens, finished, position]
        return self.kernel(
            inputs=inputs,
            template=list(k.items()),
            grid=(k["B"] * k["NT"], 1, 1),
            threadgroup=(k["NT"], 1, 1),
            **self.outputs,
        )


def _flat(*arrays):
    return mx.concatenate([a.astype(mx.float32).reshape(-1) for a in arrays])


def pack(model, memories, rotation) -> dict:
    """The kernel's weight inputs from the model as it is now and this batch's latent memories (absorbed)."""
    from .attention import absorb, dense_weight

    layers, eps = [], set()
    for layer, memory in zip(model.decoder, memories):
        sa, mlp = layer.self_attn, layer.mlp
        folded = absorb(sa, sa.q_b_proj, sa.nope_dim)
        w_a = mx.concatenate([dense_weight(sa.q_a_proj), dense_weight(sa.kv_a_proj)], axis=0).T
        norms = (layer.norm1, sa.q_a_norm, sa.kv_a_norm, layer.norm2, layer.norm3)
        eps |= {n.eps for n in norms}
        layers.append(
            _flat(
                layer.norm1.weight,
                layer.norm1.bias,
                w_a,
                sa.q_a_norm.weight,
                sa.q_a_norm.bias,
                sa.kv_a_norm.weight,
                sa.kv_a_norm.bias,
                folded.w_q,
                folded.w_o,
                layer.norm2.weight,
                layer.norm2.bias,
                memory.absorbed.w_q,
                memory.absorbed.w_o,
                layer.norm3.weight,
                layer.norm3.bias,
                dense_weight(mlp.fc1).T,
                mlp.fc1.bias,
                dense_weight(mlp.fc2).T,
                mlp.fc2.bias,
            )  # fmt: skip
        )
    final = model.decoder_norm
    if final is not None:
        eps.add(final.eps)
    if len(eps) != 1:
        raise ValueError(f"the fused step takes one layer-norm eps for the model, this one has {sorted(eps)}")
    return dict(
        weights=mx.stack(layers),
        memory=mx.stack([m.c.astype(mx.float32) for m in memories]),
        rotation=rotation.astype(mx.float32),
        embed=model.token_embed.weight.astype(mx.float32),
        head_w=dense_weight(model.head).T.astype(mx.float32),
        head_b=model.head.bias.astype(mx.float32),
        final_norm=_flat(final.weight, final.bias) if final is not None else mx.zeros((1,), dtype=mx.float32),
        eps=mx.array([eps.pop()], dtype=mx.float32),
    )
