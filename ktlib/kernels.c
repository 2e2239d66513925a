/* Compiled CPU kernels of ktlib: attention with dropout on its weights, and dropout, each one pass per row or
 * element instead of a dozen PyTorch operations.  Built on first use by ktlib/kernels.py (see there); the Python
 * side checks shapes, dtypes and devices before calling.
 *
 * Dropout's random numbers: element i of a call with keys (k1, k2) is kept when the top 16 bits of
 * mix32(mix32(i ^ k1) + k2) are >= cut, cut = round(p * 2^16): rate p to 2^-16, as the PyTorch path of
 * ktlib.layers.dropout; the kept ones are scaled by 1 / (1 - p).  mix32 is a bijective 32-bit integer hash
 * (xor-shift-multiply rounds), so the mask is a function of (keys, index): the backward pass recomputes it
 * instead of storing it.  The index of attention weight (b, h, t, s) is its position in a contiguous (B, H, T, S)
 * tensor, so dropout_apply on ones of that shape with the same keys gives the same mask (the tests compare them).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* A strided 4-d float tensor: element (a, b, c, d) at p[a * s0 + b * s1 + c * s2 + d * s3] (stride 0: broadcast). */
typedef struct {
    float *p;
    int64_t s0, s1, s2, s3;
} view4;

#define AT(v, a, b, c, d) ((v)->p[(int64_t)(a) * (v)->s0 + (int64_t)(b) * (v)->s1 + (int64_t)(c) * (v)->s2 + \
                               (int64_t)(d) * (v)->s3])
#define MAX_DK 64
#define LANES 8 /* rows of keys are padded to a multiple of this (padding keys: bias -inf, k = v = 0) */

/* a 32-bit bijective mixer; its constants are those of the published "lowbias32" xor-shift-multiply hash */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline int kept(uint32_t i, uint32_t k1, uint32_t k2, uint32_t cut) {
    return (mix32(mix32(i ^ k1) + k2) >> 16) >= cut;
}

/* exp(x) for x <= 0 (a score minus its row's maximum); exactly 0 below -87 and for -inf.  2^n * exp(r), |r| <=
 * ln(2) / 2, exp(r) by its Taylor series to r^7 (truncation error under 1e-8 relative); a loop of these vectorises. */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float n = floorf(xc * 1.44269504f + 0.5f);
    const float r = xc - n * 0.693145752f - n * 1.42860677e-6f; /* ln 2 in two parts */
    const float e = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                    r * (1.0f / 720 + r * (1.0f / 5040)))))));
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 0] */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? 0.0f : e * two_n;
}

static inline float row_max(const float *s, int n) { /* n: a multiple of LANES */
#if defined(__AVX2__)
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float m = -INFINITY;
    for (int j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    return m;
#endif
}

static inline int padded(int s) { return (s + LANES - 1) / LANES * LANES; }

/* keys or values of head (b, h), transposed: xt[d * sp + j] = x[b, h, j, d], zero for j >= s */
static void load_transposed(const view4 *x, int b, int h, int s, int sp, int dk, float *xt) {
    for (int d = 0; d < dk; d++) {
        for (int j = 0; j < s; j++) xt[d * sp + j] = AT(x, b, h, j, d);
        for (int j = s; j < sp; j++) xt[d * sp + j] = 0.0f;
    }
}

/* row t of the additive mask (0 or -inf; none: zeros), -inf on the padding keys */
static void load_bias(const view4 *bias, int b, int h, int t, int s, int sp, float *row) {
    if (bias->p)
        for (int j = 0; j < s; j++) row[j] = AT(bias, b, h, t, j);
    else
        for (int j = 0; j < s; j++) row[j] = 0.0f;
    for (int j = s; j < sp; j++) row[j] = -INFINITY;
}

typedef struct {
    int B, H, T, S, DK;
    view4 q, k, v, bias;
    float scale, keep_scale;
    int drop;             /* 0: no dropout */
    uint32_t cut, k1, k2; /* dropped: the hash's top 16 bits < cut */
    const int64_t *n_real; /* NULL, or causal self-attention on real frames first (T == S, no bias): row t of
                              sample b sees keys 0..t if t < n_real[b], else none (a zero result) */
} attn_args;

/* The sizes and settings of one call as constants of a head's loop (the compiler then keeps them in registers:
 * read through the pointer they could alias the float rows), and the head's keys and values, transposed (ld:
 * their row length, S padded). */
#define HEAD_SETUP(DKC)                                                                                       \
    const int dk = DKC ? DKC : a->DK, T = a->T, S = a->S, ld = padded(S), drop = a->drop;                     \
    const int live = a->n_real ? (int)a->n_real[b] : T; /* rows from here on see no key */                    \
    const float scale = a->scale, keep_scale = a->keep_scale;                                                 \
    const uint32_t cut = a->cut, k1 = a->k1, k2 = a->k2;                                                      \
    const int64_t head = (int64_t)b * a->H + h;                                                               \
    load_transposed(&a->k, b, h, S, ld, dk, kt);                                                              \
    load_transposed(&a->v, b, h, S, ld, dk, vt)

/* Forward of one head (b, h): out[b, h, t] = sum_j dropout(softmax(scale * q_t . k_j + bias_tj))_j v_j, and the
 * row's largest score and 1 / sum of its exponentials (stats, for the backward pass).  DKC: d_k as a constant
 * (4, 8) or 0 (read from a). */
#define ATTENTION_KERNELS(NAME, DKC)                                                                          \
static void forward_head_##NAME(const attn_args *a, int b, int h, view4 *out, float *stats,                  \
                                float *restrict kt, float *restrict vt, float *restrict w) {                  \
    HEAD_SETUP(DKC);                                                                                          \
    for (int t = 0; t < T; t++) {                                                                             \
        if (t >= live) {                                                                                      \
            for (int d = 0; d < dk; d++) AT(out, b, h, t, d) = 0.0f;                                          \
            stats[2 * (head * T + t)] = stats[2 * (head * T + t) + 1] = 0.0f;                                 \
            continue;                                                                                         \
        }                                                                                                     \
        const int n = a->n_real ? t + 1 : S, sp = padded(n); /* the keys row t may see, and with padding */  \
        load_bias(&a->bias, b, h, t, n, sp, w);                                                               \
        for (int d = 0; d < dk; d++) {                                                                        \
            const float qd = AT(&a->q, b, h, t, d) * scale;                                                   \
            const float *kr = kt + d * ld;                                                                    \
            for (int j = 0; j < sp; j++) w[j] += qd * kr[j];                                                  \
        }                                                                                                     \
        const float m = row_max(w, sp);                                                                       \
        float sum = 0.0f;                                                                                     \
        for (int j = 0; j < sp; j++) {                                                                        \
            const float e = exp_nonpositive(w[j] - m);                                                        \
            w[j] = e;                                                                                         \
            sum += e;                                                                                         \
        }                                                                                                     \
        const float inv = 1.0f / sum;                                                                         \
        const uint32_t base = (uint32_t)((head * T + t) * S);                                                 \
        if (drop) {                                                                                           \
            const float kinv = inv * keep_scale;                                                              \
            for (int j = 0; j < sp; j++) w[j] = kept(base + j, k1, k2, cut) ? w[j] * kinv : 0.0f;             \
        } else {                                                                                              \
            for (int j = 0; j < sp; j++) w[j] *= inv;                                                         \
        }                                                                                                     \
        for (int d = 0; d < dk; d++) {                                                                        \
            const float *vr = vt + d * ld;                                                                    \
            float acc = 0.0f;                                                                                 \
            for (int j = 0; j < sp; j++) acc += w[j] * vr[j];                                                 \
            AT(out, b, h, t, d) = acc;                                                                        \
        }                                                                                                     \
        stats[2 * (head * T + t)] = m;                                                                        \
        stats[2 * (head * T + t) + 1] = inv;                                                                  \
    }                                                                                                         \
}                                                                                                             \
                                                                                                              \
/* Backward of one head: the weights are recomputed from the row's stats and the mask from the keys.  With      \
 * y = dropped weights, u_j = (g . v_j) y_j, the gradient of score j is w_j (grad_w_j - sum(grad_w * w)) =     \
 * u_j - w_j sum(u); times scale it gives grad_q = sum_j ds_j k_j, grad_k_j = sum_t ds_tj q_t, and              \
 * grad_v_j = sum_t y_tj g_t. */                                                                              \
static void backward_head_##NAME(const attn_args *a, const view4 *g, const float *stats, int b, int h,        \
                                 view4 *gq, view4 *gk, view4 *gv, float *restrict kt, float *restrict vt,     \
                                 float *restrict gkt, float *restrict gvt, float *restrict w,                 \
                                 float *restrict y, float *restrict u) {                                      \
    HEAD_SETUP(DKC);                                                                                          \
    memset(gkt, 0, sizeof(float) * dk * ld);                                                                  \
    memset(gvt, 0, sizeof(float) * dk * ld);                                                                  \
    for (int t = 0; t < T; t++) {                                                                             \
        if (t >= live) {                                                                                      \
            for (int d = 0; d < dk; d++) AT(gq, b, h, t, d) = 0.0f;                                           \
            continue;                                                                                         \
        }                                                                                                     \
        const int n = a->n_real ? t + 1 : S, sp = padded(n);                                                  \
        float qt[MAX_DK], gt[MAX_DK];                                                                         \
        for (int d = 0; d < dk; d++) {                                                                        \
            qt[d] = AT(&a->q, b, h, t, d);                                                                    \
            gt[d] = AT(g, b, h, t, d);                                                                        \
        }                                                                                                     \
        load_bias(&a->bias, b, h, t, n, sp, w);                                                               \
        for (int j = 0; j < sp; j++) u[j] = 0.0f;                                                             \
        for (int d = 0; d < dk; d++) {                                                                        \
            const float qd = qt[d] * scale, gd = gt[d];                                                       \
            const float *kr = kt + d * ld, *vr = vt + d * ld;                                                 \
            for (int j = 0; j < sp; j++) {                                                                    \
                w[j] += qd * kr[j];                                                                           \
                u[j] += gd * vr[j];                                                                           \
            }                                                                                                 \
        }                                                                                                     \
        const float m = stats[2 * (head * T + t)], inv = stats[2 * (head * T + t) + 1];                       \
        const uint32_t base = (uint32_t)((head * T + t) * S);                                                 \
        for (int j = 0; j < sp; j++) w[j] = exp_nonpositive(w[j] - m) * inv;                                  \
        if (drop)                                                                                             \
            for (int j = 0; j < sp; j++) y[j] = kept(base + j, k1, k2, cut) ? w[j] * keep_scale : 0.0f;      \
        else                                                                                                  \
            memcpy(y, w, sizeof(float) * sp);                                                                 \
        float usum = 0.0f;                                                                                    \
        for (int j = 0; j < sp; j++) {                                                                        \
            u[j] *= y[j];                                                                                     \
            usum += u[j];                                                                                     \
        }                                                                                                     \
        for (int j = 0; j < sp; j++) u[j] = (u[j] - w[j] * usum) * scale;                                     \
        for (int d = 0; d < dk; d++) {                                                                        \
            const float *kr = kt + d * ld;                                                                    \
            float *gkr = gkt + d * ld, *gvr = gvt + d * ld;                                                   \
            const float qd = qt[d], gd = gt[d];                                                               \
            float acc = 0.0f;                                                                                 \
            for (int j = 0; j < sp; j++) {                                                                    \
                acc += u[j] * kr[j];                                                                          \
                gkr[j] += u[j] * qd;                                                                          \
                gvr[j] += y[j] * gd;                                                                          \
            }                                                                                                 \
            AT(gq, b, h, t, d) = acc;                                                                         \
        }                                                                                                     \
    }                                                                                                         \
    for (int j = 0; j < S; j++)                                                                               \
        for (int d = 0; d < dk; d++) {                                                                        \
            AT(gk, b, h, j, d) = gkt[d * ld + j];                                                             \
            AT(gv, b, h, j, d) = gvt[d * ld + j];                                                             \
        }                                                                                                     \
}

ATTENTION_KERNELS(dk4, 4)
ATTENTION_KERNELS(dk8, 8)
ATTENTION_KERNELS(any, 0)

/* Scratch of one thread: the backward pass needs 4 head-sized tiles (d_k x padded S) and 3 rows, the forward
 * pass 2 and 1; NULL when memory could not be had. */
#define SCRATCH 7
static int get_scratch(const attn_args *a, int backward, float *buf[SCRATCH]) {
    const int64_t row = padded(a->S), sizes[SCRATCH] = {a->DK * row, a->DK * row, a->DK * row, a->DK * row,
                                                       row, row, row};
    const int used[SCRATCH] = {1, 1, backward, backward, 1, backward, backward};
    int ok = 1;
    for (int i = 0; i < SCRATCH; i++) {
        buf[i] = used[i] ? aligned_alloc(64, (size_t)((sizes[i] * sizeof(float) + 63) / 64 * 64)) : NULL;
        ok &= !used[i] || buf[i] != NULL;
    }
    return ok;
}

/* Every head (b, h) of the batch, one per task: the forward pass (g == NULL; out: the result) or the backward
 * pass (g: the result's gradient; out, gk, gv: the gradients of q, k, v).  0, or -1 without scratch memory. */
static int all_heads(const attn_args *a, const view4 *g, float *stats, view4 *out, view4 *gk, view4 *gv,
                     int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buf[SCRATCH];
        const int ok = get_scratch(a, g != NULL, buf);
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t head = 0; head < (int64_t)a->B * a->H; head++) {
            if (!ok) continue; /* this thread's heads are left undone: the caller raises */
            const int b = (int)(head / a->H), h = (int)(head % a->H);
            float *kt = buf[0], *vt = buf[1], *gkt = buf[2], *gvt = buf[3], *w = buf[4], *y = buf[5], *u = buf[6];
            if (g == NULL && a->DK == 4) forward_head_dk4(a, b, h, out, stats, kt, vt, w);
            else if (g == NULL && a->DK == 8) forward_head_dk8(a, b, h, out, stats, kt, vt, w);
            else if (g == NULL) forward_head_any(a, b, h, out, stats, kt, vt, w);
            else if (a->DK == 4) backward_head_dk4(a, g, stats, b, h, out, gk, gv, kt, vt, gkt, gvt, w, y, u);
            else if (a->DK == 8) backward_head_dk8(a, g, stats, b, h, out, gk, gv, kt, vt, gkt, gvt, w, y, u);
            else backward_head_any(a, g, stats, b, h, out, gk, gv, kt, vt, gkt, gvt, w, y, u);
        }
        for (int i = 0; i < SCRATCH; i++) free(buf[i]);
    }
    return failed ? -1 : 0;
}

int attention_forward(attn_args a, view4 out, float *stats, int threads) {
    return all_heads(&a, NULL, stats, &out, NULL, NULL, threads);
}

int attention_backward(attn_args a, view4 g, float *stats, view4 gq, view4 gk, view4 gv, int threads) {
    return all_heads(&a, &g, stats, &gq, &gk, &gv, threads);
}

/* y = x * mask (0, or keep_scale where kept) for contiguous x, y of n elements; y may be x. */
void dropout_apply(int64_t n, const float *x, float *y, uint32_t cut, float keep_scale, uint32_t k1, uint32_t k2,
                   int threads) {
    const int64_t block = 4096;
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 4 * block)
    for (int64_t a = 0; a < n; a += block) {
        const int64_t end = a + block < n ? a + block : n;
        for (int64_t i = a; i < end; i++) y[i] = kept((uint32_t)i, k1, k2, cut) ? x[i] * keep_scale : 0.0f;
    }
}
