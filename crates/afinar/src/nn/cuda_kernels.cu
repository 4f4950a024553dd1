// afinar's CUDA kernels, launched by the `cuda` module of each op file in nn/ (linear.rs,
// norm.rs, attention/ ...) through nn/cuda.rs; build.rs compiles this one file to one PTX module
// with nvcc when the `cuda` feature is on. Every kernel that touches activations has an f32 and a
// bf16 instance (suffix _f32 / _bf16). bf16 is carried as its 16 bits and converted by hand, so
// no CUDA header is needed: loads widen exactly, stores round to nearest even (NaN stays NaN).
// Arithmetic is always f32.

typedef unsigned short bf16;

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, long long i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, long long i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i] = (bf16)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16)(u >> 16);
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024). `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = l < nw ? sh[l] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (l == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        v = l < nw ? sh[l] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (l == 0) sh[0] = v;
    }
    __syncthreads();
    return sh[0];
}

// ------------------------------------------------------------------ RMSNorm
// One block per row of d: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps) kept for backward.
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, float* rstd, int d, float eps) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld(xr, i);
        s += v * v;
    }
    s = block_sum(s, sh);
    float rs = 1.f / sqrtf(s / d + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int i = threadIdx.x; i < d; i += blockDim.x) st(yr, i, ld(xr, i) * rs * ld(w, i));
}

// dx = rstd * w * dy - x * rstd^3 * sum(w * dy * x) / d
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* dy, const float* rstd, T* dx, int d) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dr = dx + r * d;
    float rs = rstd[r];
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += ld(w, i) * ld(gr, i) * ld(xr, i);
    s = block_sum(s, sh);
    float c = s * rs * rs * rs / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        st(dr, i, rs * ld(w, i) * ld(gr, i) - ld(xr, i) * c);
}

// ------------------------------------------------------------------ LayerNorm
// y = (x - mean) * rstd * w + b; mean and rstd kept for backward.
template <typename T>
__device__ void ln_fwd(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, int d,
                       float eps) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += ld(xr, i);
    float mu = block_sum(s, sh) / d;
    float q = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = ld(xr, i) - mu;
        q += v * v;
    }
    float rs = 1.f / sqrtf(block_sum(q, sh) / d + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        st(yr, i, (ld(xr, i) - mu) * rs * ld(w, i) + ld(b, i));
}

// dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat))
template <typename T>
__device__ void ln_bwd(const T* x, const T* w, const T* dy, const float* mean, const float* rstd,
                       T* dx, int d) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dr = dx + r * d;
    float mu = mean[r], rs = rstd[r];
    float a = 0.f, c = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float g = ld(w, i) * ld(gr, i);
        a += g;
        c += g * (ld(xr, i) - mu) * rs;
    }
    a = block_sum(a, sh) / d;
    c = block_sum(c, sh) / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float g = ld(w, i) * ld(gr, i);
        float xh = (ld(xr, i) - mu) * rs;
        st(dr, i, rs * (g - a - xh * c));
    }
}

// ------------------------------------------------------------------ RoPE
// rotate_half layout; rows of heads * hd; sgn = -1 rotates back (the backward).
template <typename T>
__device__ void rope(const T* x, T* y, const float* cs, const float* sn, const unsigned* pos,
                     long long rows, int heads, int hd, float sgn) {
    int half = hd / 2;
    long long n = rows * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long rh = idx / half;
        long long row = rh / heads;
        long long base = rh * hd;
        long long p = pos[row];
        float c = cs[p * half + i], s = sgn * sn[p * half + i];
        float x1 = ld(x, base + i), x2 = ld(x, base + i + half);
        st(y, base + i, x1 * c - x2 * s);
        st(y, base + i + half, x2 * c + x1 * s);
    }
}

// ------------------------------------------------------------------ activations
__device__ __forceinline__ float sigm(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ void silu_mul_fwd(const T* g, const T* u, T* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float a = ld(g, i);
        st(out, i, a * sigm(a) * ld(u, i));
    }
}

template <typename T>
__device__ void silu_mul_bwd(const T* g, const T* u, const T* dy, T* dg, T* du, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float a = ld(g, i), s = sigm(a), d = ld(dy, i);
        st(dg, i, d * ld(u, i) * s * (1.f + a * (1.f - s)));
        st(du, i, d * a * s);
    }
}

__device__ __forceinline__ float gelu_t(float x) {
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_t_grad(float x) {
    const float k = 0.7978845608028654f;
    float u = k * (x + 0.044715f * x * x * x);
    float t = tanhf(u);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
}
__device__ __forceinline__ float gelu_e(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }
__device__ __forceinline__ float gelu_e_grad(float x) {
    return 0.5f * (1.f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

// kind 0: tanh GELU, 1: exact (erf) GELU
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, long long n, int kind) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        st(y, i, kind == 0 ? gelu_t(v) : gelu_e(v));
    }
}
template <typename T>
__device__ void gelu_bwd(const T* x, const T* dy, T* dx, long long n, int kind) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        st(dx, i, ld(dy, i) * (kind == 0 ? gelu_t_grad(v) : gelu_e_grad(v)));
    }
}

// ------------------------------------------------------------------ dropout
// The counter-based mask of nn::dropout::uniform: element i is kept when
// uniform(seed, i) >= p, so CPU and GPU drop the same elements.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    unsigned long long z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned long long i) {
    unsigned long long z = splitmix64(seed + i * 0x9E3779B97F4A7C15ull);
    return (float)(z >> 40) * (1.f / 16777216.f);
}
template <typename T>
__device__ void dropout(const T* x, T* y, long long n, float p, unsigned long long seed) {
    float scale = 1.f / (1.f - p);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        st(y, i, uniform01(seed, (unsigned long long)i) >= p ? ld(x, i) * scale : 0.f);
}

// ------------------------------------------------------------------ attention softmax
// Scores s [B * KV, G * T, T]: for each kv head, the rows of its G query heads one after the
// other (grouped-query attention without copying K and V per query head). One warp per row
// (blockDim.x / 32 rows per block, blockIdx.y = b * KV + kv). Probabilities
// p = softmax(s * scale) over the visible keys: j <= i (if causal), key_mask[b, j] != 0, same
// segment (if segments). Masked keys get exactly 0; a row with no visible key is all 0 (as on
// the CPU).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename T>
__device__ void attn_softmax(const T* s, T* p, const float* km, const unsigned* seg, int kv_heads,
                             int t, int rows, float scale, int causal) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    int qi = row % t;
    long long bh = blockIdx.y;
    long long b = bh / kv_heads;
    const T* sr = s + (bh * rows + row) * (long long)t;
    T* pr = p + (bh * rows + row) * (long long)t;
    const float* kmb = km + b * t;
    const unsigned* sg = seg ? seg + b * t : 0;
    unsigned sq = sg ? sg[qi] : 0u;
    int n = causal ? qi + 1 : t;
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32) {
        bool vis = kmb[j] != 0.f && (!sg || sg[j] == sq);
        if (vis) mx = fmaxf(mx, ld(sr, j) * scale);
    }
    mx = warp_max(mx);
    if (mx == -INFINITY) {
        for (int j = lane; j < t; j += 32) st(pr, j, 0.f);
        return;
    }
    float sum = 0.f;
    for (int j = lane; j < n; j += 32) {
        bool vis = kmb[j] != 0.f && (!sg || sg[j] == sq);
        if (vis) sum += expf(ld(sr, j) * scale - mx) * kmb[j];
    }
    float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < t; j += 32) {
        bool vis = j < n && kmb[j] != 0.f && (!sg || sg[j] == sq);
        st(pr, j, vis ? expf(ld(sr, j) * scale - mx) * kmb[j] * inv : 0.f);
    }
}

// ds = p * (dp - sum(p * dp)) * scale, one warp per row of t (`rows` rows in all).
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, long long rows, int t, float scale) {
    long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    int lane = threadIdx.x & 31;
    const T* pr = p + r * t;
    const T* gr = dp + r * t;
    T* dr = ds + r * t;
    float s = 0.f;
    for (int j = lane; j < t; j += 32) s += ld(pr, j) * ld(gr, j);
    s = warp_sum(s);
    for (int j = lane; j < t; j += 32) st(dr, j, ld(pr, j) * (ld(gr, j) - s) * scale);
}

// out[b, y, x, :] = in[b, x, y, :] for in [B, X, Y, D]: tokens-first <-> heads-first.
template <typename T>
__device__ void swap12(const T* in, T* out, long long bn, int xn, int yn, int d) {
    long long n = bn * xn * yn * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        int k = (int)(i % d);
        long long r = i / d;
        int x = (int)(r % xn);
        r /= xn;
        int y = (int)(r % yn);
        long long b = r / yn;
        out[i] = in[((b * xn + x) * yn + y) * d + k];
    }
}

// ------------------------------------------------------------------ cross-entropy
// Rows of logits [m, V] (one block per row): lse and loss = lse - logit[target].
template <typename T>
__device__ void ce_fwd(const T* logits, const long long* tg, float* lse, float* loss, int v) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const T* lr = logits + r * v;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, ld(lr, j));
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(ld(lr, j) - mx);
    s = block_sum(s, sh);
    if (threadIdx.x == 0) {
        float l = mx + logf(s);
        lse[r] = l;
        loss[r] = l - ld(lr, tg[r]);
    }
}

// In place: logits -> (softmax - onehot(target)) * g.
template <typename T>
__device__ void ce_bwd(T* logits, const float* lse, const long long* tg, int v, float g) {
    long long r = blockIdx.x;
    T* lr = logits + r * v;
    float l = lse[r];
    long long t = tg[r];
    for (int j = threadIdx.x; j < v; j += blockDim.x)
        st(lr, j, (expf(ld(lr, j) - l) - (j == t ? 1.f : 0.f)) * g);
}

// ------------------------------------------------------------------ instances
#define INSTANCES(T, S)                                                                            \
    extern "C" __global__ void rms_fwd_##S(const T* x, const T* w, T* y, float* rstd, int d,      \
                                           float eps) {                                            \
        rms_fwd<T>(x, w, y, rstd, d, eps);                                                         \
    }                                                                                              \
    extern "C" __global__ void rms_bwd_##S(const T* x, const T* w, const T* dy, const float* rstd, \
                                           T* dx, int d) {                                         \
        rms_bwd<T>(x, w, dy, rstd, dx, d);                                                         \
    }                                                                                              \
    extern "C" __global__ void ln_fwd_##S(const T* x, const T* w, const T* b, T* y, float* mean,  \
                                          float* rstd, int d, float eps) {                         \
        ln_fwd<T>(x, w, b, y, mean, rstd, d, eps);                                                 \
    }                                                                                              \
    extern "C" __global__ void ln_bwd_##S(const T* x, const T* w, const T* dy, const float* mean, \
                                          const float* rstd, T* dx, int d) {                       \
        ln_bwd<T>(x, w, dy, mean, rstd, dx, d);                                                    \
    }                                                                                              \
    extern "C" __global__ void rope_##S(const T* x, T* y, const float* c, const float* s,         \
                                        const unsigned* pos, long long rows, int heads, int hd,    \
                                        float sgn) {                                               \
        rope<T>(x, y, c, s, pos, rows, heads, hd, sgn);                                            \
    }                                                                                              \
    extern "C" __global__ void silu_mul_fwd_##S(const T* g, const T* u, T* o, long long n) {       \
        silu_mul_fwd<T>(g, u, o, n);                                                               \
    }                                                                                              \
    extern "C" __global__ void silu_mul_bwd_##S(const T* g, const T* u, const T* dy, T* dg, T* du, \
                                                long long n) {                                     \
        silu_mul_bwd<T>(g, u, dy, dg, du, n);                                                      \
    }                                                                                              \
    extern "C" __global__ void gelu_fwd_##S(const T* x, T* y, long long n, int kind) {             \
        gelu_fwd<T>(x, y, n, kind);                                                                \
    }                                                                                              \
    extern "C" __global__ void gelu_bwd_##S(const T* x, const T* dy, T* dx, long long n,           \
                                            int kind) {                                            \
        gelu_bwd<T>(x, dy, dx, n, kind);                                                           \
    }                                                                                              \
    extern "C" __global__ void dropout_##S(const T* x, T* y, long long n, float p,                 \
                                           unsigned long long seed) {                              \
        dropout<T>(x, y, n, p, seed);                                                              \
    }                                                                                              \
    extern "C" __global__ void attn_softmax_##S(const T* s, T* p, const float* km,                 \
                                                const unsigned* seg, int kv_heads, int t,          \
                                                int rows, float scale, int causal) {               \
        attn_softmax<T>(s, p, km, seg, kv_heads, t, rows, scale, causal);                          \
    }                                                                                              \
    extern "C" __global__ void softmax_bwd_##S(const T* p, const T* dp, T* ds, long long rows,     \
                                               int t, float scale) {                               \
        softmax_bwd<T>(p, dp, ds, rows, t, scale);                                                 \
    }                                                                                              \
    extern "C" __global__ void swap12_##S(const T* in, T* out, long long b, int x, int y, int d) { \
        swap12<T>(in, out, b, x, y, d);                                                            \
    }                                                                                              \
    extern "C" __global__ void ce_fwd_##S(const T* l, const long long* tg, float* lse,             \
                                          float* loss, int v) {                                    \
        ce_fwd<T>(l, tg, lse, loss, v);                                                            \
    }                                                                                              \
    extern "C" __global__ void ce_bwd_##S(T* l, const float* lse, const long long* tg, int v,      \
                                          float g) {                                               \
        ce_bwd<T>(l, lse, tg, v, g);                                                               \
    }

INSTANCES(float, f32)
INSTANCES(bf16, bf16)

// ------------------------------------------------------------------ AdamW
// One fused update per parameter tensor (f32 master weights), the same arithmetic as the CPU's.
extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, long long n,
                                     float lr, float wd, float b1, float b2, float eps, float bc1,
                                     float bc2_sqrt, float gscale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * gscale;
        float mi = b1 * m[i] + (1.f - b1) * gi;
        float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] * (1.f - lr * wd);
        p[i] = pi - lr / bc1 * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// Sum of squares of a f32 tensor into out[slot] (grad norm: one read of every gradient, one sync).
extern "C" __global__ void sumsq_f32(const float* g, long long n, float* out, int slot) {
    __shared__ float sh[32];
    float s = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        s += g[i] * g[i];
    s = block_sum(s, sh);
    if (threadIdx.x == 0) atomicAdd(out + slot, s);
}
