/* twigvlm's native decoder layers for CPU decoding: a range of Llama-style layers over a few new tokens, in one call.
 *
 * A decode step (and a draft, and a verification) runs every layer on 1 to ~16 new tokens against the cache. Run
 * through the stock layer, each layer is a few dozen small torch operations and Python frames around seven weight
 * products; on a small decoder those cost as much as the products (about 0.2 ms a layer on a 2-core CPU). Here the
 * whole range runs in one call inside one OpenMP parallel region, the threads meeting at barriers between phases
 * (`barrier.h`'s, which sleep after a short spin: a busy machine's other processes get the cores back):
 *
 *   h = rmsnorm(x) · w1;  q, k, v = h·Wqᵀ(+b), h·Wkᵀ(+b), h·Wvᵀ(+b);  q, k rotated (rotate-half RoPE, given cos/sin);
 *   k, v written into the cache after its `len` entries;  a = softmax(q·kᵀ · scaling, masked) · v (grouped heads);
 *   x += a·Woᵀ(+b);  h = rmsnorm(x) · w2;  x += (silu(h·Wgᵀ) * h·Wuᵀ)·Wdᵀ
 *
 * — the arithmetic of transformers' LlamaDecoderLayer (and Qwen2's, Mistral's …), with the products on the same
 * kernels as the layers' own products (`gemv.c` for fp32 weights, `panel.c` for int8 panels with per-row scales;
 * x and the accumulation fp32). The mask is causal
 * with the block aligned to the end of the keys, or, with a `tail` [R, q, m], what each row's tail says over its last
 * m keys (draft trees) while every query sees its row's keys before them. Which layers qualify and the oracle against the
 * stock layer are twigvlm/runtime/native_layers.py's.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* RUSAGE_THREAD (before any system header) */
#endif
#include "gemv.c"
#include "gemm.c"
#include "panel.c"
#include "barrier.h"

#include <math.h>
#include <stdlib.h>
#include <sys/resource.h>

enum { TWIG_F32 = 0, TWIG_I8 = 1 };

typedef struct {
  const void *w;      /* fp32 [out, in], or int8 panels [ceil(out / PW)][in][PW] (panel.c) with scale */
  const float *scale; /* [out] for int8, else NULL */
  const float *bias;  /* [out] or NULL */
  int64_t out, in, fmt;
} twig_linear;

typedef struct {
  twig_linear q, k, v, o, gate, up, down;
  const float *norm1, *norm2; /* [hidden] */
  double eps1, eps2, scaling;
  int64_t hidden, heads, kv_heads, head_dim, inter;
} twig_layer;

/* From this many rows on (a tree's verification, a batch's step) fp32 products run gemm.c's lane-order tiles:
 * gemv.c's bits, faster past 16 rows (the demo's layers from memory on AVX2: 20, 24, 32 and 64 rows 1.07×, 1.26×,
 * 1.13× and 1.37×), where gemv.c's chunks of 8 rows leave a short one; at 16 rows gemv.c is 1.11× faster. */
#define LANES_ROWS 17

static void span(const twig_linear *L, const float *x, float *y, int64_t n, int t, int nt) {
  if (L->fmt == TWIG_I8)
    i8p_span(x, (const int8_t *)L->w, L->scale, L->bias, y, n, L->in, L->out, t, nt);
  else if (n >= LANES_ROWS)
    f32_lanes_span(x, (const float *)L->w, L->bias, y, n, L->in, L->out, t, nt);
  else
    f32_span(x, (const float *)L->w, L->bias, y, n, L->in, L->out, t, nt);
}

/* y[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, rows r of [n, d] (as LlamaRMSNorm, in fp32) */
static void rmsnorm(const float *x, const float *w, double eps, float *y, int64_t n, int64_t d) {
  for (int64_t r = 0; r < n; ++r) {
    const float *xr = x + r * d;
    float *yr = y + r * d;
    double ss = 0.0;
    for (int64_t j = 0; j < d; ++j) ss += (double)xr[j] * xr[j];
    const float inv = 1.0f / sqrtf((float)(ss / (double)d) + (float)eps);
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * inv);
  }
}

/* v [D] rotated in place: out[j] = v[j]·cos[j] − v[j+D/2]·sin[j] (j < D/2), v[j]·cos[j] + v[j−D/2]·sin[j] else */
static void rope(float *v, const float *cos, const float *sin, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float a = v[j], b = v[j + half];
    v[j] = a * cos[j] - b * sin[j];
    v[j + half] = b * cos[j + half] + a * sin[j + half];
  }
}

/* exp of VEC lanes (Cephes' expf: range reduction by ln 2 in two parts, a degree-6 polynomial, 2^n from the
 * exponent bits; within 2 ulp of expf over the range softmax uses, and 0 below −87) */
#if VEC == 16 && defined(__AVX512F__)
static inline vec vexp(vec x) {
  const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.3762626647949f));
  const vec n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  vec y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps((__mmask16)~under, y, _mm512_castsi512_ps(e));
}
#elif VEC == 8 && defined(__AVX2__)
static inline vec vexp(vec x) {
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
  const vec n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  vec y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}
#else
static inline vec vexp(vec x) {
  vec r;
  for (int j = 0; j < VEC; ++j) r.v[j] = x.v[j] < -87.0f ? 0.0f : expf(x.v[j]);
  return r;
}
#endif

/* sc[0..n) = exp(sc − mx) in place; returns their sum */
static float exp_shifted(float *sc, int64_t n, float mx) {
  const vec shift = vset1(mx);
  vec sum = vzero();
  int64_t j = 0;
  for (; j + VEC <= n; j += VEC) {
    const vec e = vexp(vsub(vload(sc + j), shift));
    vstore(sc + j, e);
    sum = vadd(sum, e);
  }
  float total = vsum(sum);
  for (; j < n; ++j) {
    sc[j] = sc[j] - mx < -87.0f ? 0.0f : expf(sc[j] - mx);
    total += sc[j];
  }
  return total;
}

/* g[0..n) = silu(g) · u = g / (1 + exp(−g)) · u, lane-wise (exp(−g) is 0 for g > 87: then g · u, as silu is).
 * The last few (fewer than a vector) go through the same vector arithmetic, padded: where the threads' shares
 * start depends on how many tokens a call holds, and an element must get the same bits wherever it falls. */
static inline vec silu_times(vec x, vec u) {
  return vmul(vdiv(x, vadd(vset1(1.0f), vexp(vsub(vzero(), x)))), u);
}
static void silu_mul(float *g, const float *u, int64_t n) {
  int64_t j = 0;
  for (; j + VEC <= n; j += VEC) vstore(g + j, silu_times(vload(g + j), vload(u + j)));
  if (j < n) {
    float xs[VEC] = {0}, us[VEC] = {0}, ys[VEC];
    for (int64_t c = 0; c < n - j; ++c) xs[c] = g[j + c], us[c] = u[j + c];
    vstore(ys, silu_times(vload(xs), vload(us)));
    for (int64_t c = 0; c < n - j; ++c) g[j + c] = ys[c];
  }
}

/* out [D] = Σ_j p[j] · v[j] over `n` value rows of D (held in registers where D is at most 8 vectors) */
static void weighted_sum(const float *p, const float *v, int64_t n, int64_t D, float *out) {
  if (D % VEC == 0 && D / VEC <= 8) {
    const int64_t c = D / VEC;
    vec acc[8];
    for (int64_t i = 0; i < c; ++i) acc[i] = vzero();
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.f) continue;
      const vec pj = vset1(p[j]);
      for (int64_t i = 0; i < c; ++i) acc[i] = vfma(pj, vload(v + j * D + i * VEC), acc[i]);
    }
    for (int64_t i = 0; i < c; ++i) vstore(out + i * VEC, acc[i]);
    return;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    for (int64_t d = 0; d < D; ++d) out[d] += p[j] * v[j * D + d];
  }
}

/* scratch of one layer call, [n, ·] each, and `keys` scores per thread */
typedef struct {
  float *h, *q, *k, *v, *a, *o, *g, *u, *scores;
  int64_t keys; /* the most keys one query reads (scores per thread) */
} scratch;

/* One layer on x [R·q, hidden] (updated in place): R sequences (rows) of q new tokens each, row r's cache at kbuf,
 * vbuf + r·row_stride ([kv_heads, cap, head_dim]) holding len[r] entries. Inside the parallel region (thread t of nt). */
static void layer_forward(const twig_layer *L, float *x, int64_t R, int64_t q, const float *cos, const float *sin,
                          float *kbuf, float *vbuf, int64_t cap, const int64_t *len, const uint8_t *tail, int64_t m,
                          const scratch *s, twig_barrier *bar, int t, int nt) {
  const int64_t H = L->hidden, D = L->head_dim, NH = L->heads, NKV = L->kv_heads, I = L->inter;
  const int64_t QD = NH * D, KD = NKV * D, group = NH / NKV, n = R * q, row_stride = NKV * cap * D;
  if (t == 0) rmsnorm(x, L->norm1, L->eps1, s->h, n, H);
  twig_barrier_wait(bar);
  span(&L->q, s->h, s->q, n, t, nt);
  span(&L->k, s->h, s->k, n, t, nt);
  span(&L->v, s->h, s->v, n, t, nt);
  twig_barrier_wait(bar);
  /* RoPE on each (token, head) of q and k; the block's keys and values go into each row's cache after its own */
  for (int64_t task = t; task < n * (NH + NKV); task += nt) {
    const int64_t i = task / (NH + NKV), head = task % (NH + NKV), r = i / q, j = i % q;
    const float *c = cos + i * D, *sn = sin + i * D;
    if (head < NH) {
      rope(s->q + i * QD + head * D, c, sn, D);
    } else {
      const int64_t g = head - NH, at = r * row_stride + (g * cap + len[r] + j) * D;
      float *kk = s->k + i * KD + g * D, *kd = kbuf + at, *vd = vbuf + at;
      const float *vs = s->v + i * KD + g * D;
      rope(kk, c, sn, D);
      for (int64_t d = 0; d < D; ++d) kd[d] = kk[d], vd[d] = vs[d];
    }
  }
  twig_barrier_wait(bar);
  /* attention, one (token, head) at a time, over its row's keys; each thread takes a run of consecutive tasks, so
   * the query heads that share a key-value head mostly share a core too (its keys and values read from memory
   * once, then from the core's cache) */
  float *sc = s->scores + (int64_t)t * s->keys;
  const int64_t tasks = n * NH, per_thread = (tasks + nt - 1) / nt, first = t * per_thread;
  const int64_t end = first + per_thread < tasks ? first + per_thread : tasks;
  for (int64_t task = first; task < end; ++task) {
    const int64_t i = task / NH, head = task % NH, g = head / group, r = i / q, j = i % q;
    const float *qv = s->q + i * QD + head * D;
    const float *kb = kbuf + r * row_stride + g * cap * D, *vb = vbuf + r * row_stride + g * cap * D;
    const int64_t keys = len[r] + q;
    const int64_t open = tail ? keys - m : len[r] + j + 1; /* keys the query sees whatever the tail says */
    const int64_t last = tail ? keys : len[r] + j + 1;
    const uint8_t *seen = tail ? tail + i * m : NULL; /* its row of the tail: [m] (i = r·q + j) */
    f32_BY_ROWS[1](qv, kb, NULL, sc, D, last, 0, last); /* q · k for every visible key: [last] */
    const float scaling = (float)L->scaling;
    float mx = -INFINITY;
    for (int64_t k = 0; k < last; ++k) {
      sc[k] = k >= open && !seen[k - open] ? -INFINITY : sc[k] * scaling;
      mx = sc[k] > mx ? sc[k] : mx;
    }
    const float total = exp_shifted(sc, last, mx); /* masked keys: exp(−inf) = 0 */
    float *out = s->a + i * QD + head * D;
    weighted_sum(sc, vb, last, D, out);
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
  twig_barrier_wait(bar);
  span(&L->o, s->a, s->o, n, t, nt);
  twig_barrier_wait(bar);
  if (t == 0) {
    for (int64_t j = 0; j < n * H; ++j) x[j] += s->o[j];
    rmsnorm(x, L->norm2, L->eps2, s->h, n, H);
  }
  twig_barrier_wait(bar);
  span(&L->gate, s->h, s->g, n, t, nt);
  span(&L->up, s->h, s->u, n, t, nt);
  twig_barrier_wait(bar);
  {
    const int64_t per = (n * I + nt - 1) / nt, j0 = t * per, j1 = j0 + per < n * I ? j0 + per : n * I;
    silu_mul(s->g + j0, s->u + j0, j1 > j0 ? j1 - j0 : 0);
  }
  twig_barrier_wait(bar);
  span(&L->down, s->g, s->o, n, t, nt);
  twig_barrier_wait(bar);
  if (t == 0)
    for (int64_t j = 0; j < n * H; ++j) x[j] += s->o[j];
  twig_barrier_wait(bar);
}

/* Set the barriers' spin before sleeping, in ns (for tests), returning the one it replaces; and how many times a
 * thread has slept at a barrier so far. */
int64_t twig_set_spin_ns(int64_t ns) { return atomic_exchange(&twig_spin_ns, ns < 0 ? 0 : ns); }
int64_t twig_barrier_sleeps(void) { return atomic_load(&twig_sleeps); }

/* Involuntary context switches of a thread so far (the scheduler gave its core to another runnable thread: a busy
 * machine): each call of the layers reports its threads' own, what `thread_governor.py` reads to shrink the team.
 * A wait at a barrier sleeps voluntarily, so it does not count. 0 where the OS counts none per thread (macOS). */
static long long twig_nivcsw(void) {
#ifdef RUSAGE_THREAD
  struct rusage u;
  if (getrusage(RUSAGE_THREAD, &u) == 0) return (long long)u.ru_nivcsw;
#endif
  return 0;
}

/* `count` layers in order on x [R·q, hidden] (updated in place): R rows (sequences) of q new tokens each. cos, sin
 * [R·q, head_dim]; layer i's cache buffers kbufs[i], vbufs[i] [R, kv_heads, caps[i], head_dim], row r holding
 * lens[i·R + r] entries with room for q more (written here; the caller counts them); tail [R, q, m] or NULL (causal):
 * row r's query j sees every key before its row's last m and, among those, what tail[r][j] says (draft trees).
 * `preempted` (or NULL): the team's involuntary context switches during the call. Returns 0, 1 on bad sizes, 2
 * when out of memory. */
int twig_layers(const twig_layer *const *layers, int64_t count, float *x, int64_t R, int64_t q, const float *cos,
                const float *sin, float *const *kbufs, float *const *vbufs, const int64_t *caps, const int64_t *lens,
                const uint8_t *tail, int64_t m, int threads, int64_t *preempted) {
  if (count < 1 || R < 1 || q < 1 || (tail && m < 1)) return 1;
  if (threads < 1) threads = 1;
  const int64_t n = R * q;
  int64_t QD = 0, KD = 0, I = 0, H = layers[0]->hidden, keys = 0;
  for (int64_t i = 0; i < count; ++i) {
    const twig_layer *L = layers[i];
    if (L->hidden != H || L->kv_heads < 1 || L->heads % L->kv_heads) return 1;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t held = lens[i * R + r];
      if (held < 0 || held + q > caps[i]) return 1; /* (a tail longer than a row's keys: its first columns
                                                        fall before them and are never read) */
      keys = held + q > keys ? held + q : keys;
    }
    QD = L->heads * L->head_dim > QD ? L->heads * L->head_dim : QD;
    KD = L->kv_heads * L->head_dim > KD ? L->kv_heads * L->head_dim : KD;
    I = L->inter > I ? L->inter : I;
  }
  const int64_t wide = H > QD ? H : QD;
  const int64_t total = n * (wide + 2 * QD + 2 * KD + H + 2 * I) + (int64_t)threads * keys;
  float *mem = (float *)malloc((size_t)total * sizeof(float));
  if (!mem) return 2;
  scratch s;
  s.h = mem;
  s.q = s.h + n * wide;
  s.a = s.q + n * QD;
  s.k = s.a + n * QD;
  s.v = s.k + n * KD;
  s.o = s.v + n * KD;
  s.g = s.o + n * H;
  s.u = s.g + n * I;
  s.scores = s.u + n * I;
  s.keys = keys;
  twig_barrier bar;
  atomic_llong switched = 0; /* the team's involuntary switches during this call (`preempted`, where asked) */
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
    THREAD_IDS(t, nt);
    const long long before = twig_nivcsw();
#pragma omp single
    twig_barrier_init(&bar, nt); /* (the team's size; its implicit barrier publishes it) */
    for (int64_t i = 0; i < count; ++i)
      layer_forward(layers[i], x, R, q, cos, sin, kbufs[i], vbufs[i], caps[i], lens + i * R, tail, m, &s, &bar, t,
                    nt);
    atomic_fetch_add_explicit(&switched, twig_nivcsw() - before, memory_order_relaxed);
  }
  free(mem);
  if (preempted) *preempted = atomic_load(&switched);
  return 0;
}
