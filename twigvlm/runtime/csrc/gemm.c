/* twigvlm's many-row products (a prompt's prefill): y[r, o] = scale[o] * sum_k x[r, k] * w[o, k] (+ b[o]).
 *
 * Over a prompt's hundreds of rows a product is bound by arithmetic, not by reading the weights, and gemv.c's
 * kernels (each output a dot product of two rows, summed across a vector at the end) reach about half of the FMA
 * units' rate at best (a 2-core AVX2 EPYC, operands in L1: 46-57% for dot-product tiles of 1-8 rows of x by 1-8
 * weight rows, 84% for this kernel's). Here, as in BLAS libraries, the weights are first copied, a block of KC
 * columns at a time, into panels of NR = 2·VEC outputs laid out column by column (fp32; bf16 widened exactly on
 * the way, and int8 from its own stored panels: panel.c), and a micro-kernel keeps an MR × NR block of y in
 * registers: per column k it loads two vectors of the panel and multiplies them by each of MR broadcast x[r, k] —
 * 2·MR FMAs for MR + 2 loads. The copy costs one pass over the weights per call; the products cost n passes.
 *
 * Each output is one lane of one accumulator summed over k in order, across the KC blocks (y holds it between
 * blocks), then multiplied by its scale and the bias added (one fused rounding): so a row's result does not depend
 * on how many rows are multiplied with it, nor on the thread count (threads split the outputs). For int8 weights
 * this is also panel.c's order, so a prompt's rows and a decode step's agree; fp32 and bf16 weights differ from
 * gemv.c's order of additions (whose products over 1 to 64 rows decoding and verification run, alone, so
 * speculation stays exact).
 *
 * Included by layer.c after gemv.c, whose vector helpers it uses.
 */
#include <pthread.h>
#include <stdlib.h>

#define MR 6           /* rows of x per micro-tile: 2·MR accumulators (12 of AVX2's 16 registers) */
#define NR (2 * VEC)   /* outputs per panel */
#ifndef KC
#define KC 256 /* at most this many columns per block (the columns split evenly): an MR × KC block of x and an
                  NR × KC panel stay in L1 (576 columns as 3 × 192, not 256 + 256 + 64: 5-10% faster) */
#endif
#ifndef NC
#define NC (8 * NR) /* outputs packed at a time: KC × NC fp32 (128 KiB with AVX2) stays in L2 */
#endif

/* Eight consecutive weights of a row widened to fp32, and the 8 × 8 transpose that turns eight rows of eight
 * into eight columns (AVX2, also in AVX-512 builds); elsewhere the copy runs one weight at a time. */
#if defined(__AVX2__)
#define PACK8 1
static inline __m256 w8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 w8_bf16(const uint16_t *p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#else
#define PACK8 0
#endif

/* Weight rows o0 .. o0 + nc (nc a multiple of NR; rows past `out` read as zero), columns k0 .. k0 + kc, into
 * panels p [nc / NR][kc][NR] fp32. */
#define GEMM_PACK(NAME, T)                                                                         \
  static void NAME##_pack(const T *w, float *p, int64_t in, int64_t out, int64_t o0, int64_t nc,   \
                          int64_t k0, int64_t kc) {                                                \
    for (int64_t j = 0; j < nc; j += 8) { /* eight outputs: one column of eight in a panel */      \
      float *dst = p + (j / NR) * kc * NR + j % NR;                                                 \
      const T *src = w + (o0 + j) * in + k0;                                                        \
      int64_t k = 0;                                                                                \
      if (PACK8 && o0 + j + 8 <= out)                                                               \
        for (; k + 8 <= kc; k += 8) {                                                               \
          PACK8_STEP(NAME)                                                                          \
        }                                                                                           \
      for (; k < kc; ++k)                                                                           \
        for (int c = 0; c < 8; ++c)                                                                 \
          dst[k * NR + c] = o0 + j + c < out ? scalar_##NAME(src, c * in + k) : 0.f;                \
    }                                                                                               \
  }
#if PACK8
#define PACK8_STEP(NAME)                                                                           \
  __m256 r[8];                                                                                      \
  for (int c = 0; c < 8; ++c) r[c] = w8_##NAME(src + c * in + k);                                   \
  transpose8(r);                                                                                    \
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(dst + (k + c) * NR, r[c]);
#else
#define PACK8_STEP(NAME)
#endif
GEMM_PACK(f32, float)
GEMM_PACK(bf16, uint16_t)

/* n ≤ VEC floats at p, the rest of the vector zero. */
static inline vec vload_part(const float *p, int n) {
  float tmp[VEC];
  for (int c = 0; c < VEC; ++c) tmp[c] = c < n ? p[c] : 0.f;
  return vload(tmp);
}

/* Column k of a panel p [·][NR] into the M × NR block of sums a0, a1 (rows of x at stride ldx): two loads of the
 * panel, M broadcasts of x[r, k], 2·M FMAs. */
#define COLUMN(M, k)                                                                               \
  {                                                                                                \
    const vec b0 = vload(p + (k) * NR), b1 = vload(p + (k) * NR + VEC);                            \
    for (int r = 0; r < M; ++r) {                                                                  \
      const vec xr = vset1(x[r * ldx + (k)]);                                                      \
      a0[r] = vfma(xr, b0, a0[r]);                                                                 \
      a1[r] = vfma(xr, b1, a1[r]);                                                                 \
    }                                                                                              \
  }

/* M rows of x (row stride ldx) times one panel [kc][NR] into y (row stride ldy), the first `cols` ≤ NR outputs
 * valid: y starts from zero on the first block and from what it holds on the others; on the last block each
 * output is multiplied by its scale s and the bias b is added (each NULL, or the panel's outputs'). */
#define MICRO(M)                                                                                   \
  static void micro_##M(const float *restrict x, int64_t ldx, const float *restrict p, int64_t kc,  \
                        float *restrict y, int64_t ldy, int cols, int first, int last,              \
                        const float *restrict s, const float *restrict b) {                         \
    const int n0 = cols < VEC ? cols : VEC, n1 = cols - n0; /* valid outputs in each vector */      \
    vec a0[M], a1[M];                                                                               \
    for (int r = 0; r < M; ++r) {                                                                   \
      a0[r] = first ? vzero() : cols == NR ? vload(y + r * ldy) : vload_part(y + r * ldy, n0);       \
      a1[r] = first ? vzero() : cols == NR ? vload(y + r * ldy + VEC) : vload_part(y + r * ldy + VEC, n1); \
    }                                                                                               \
    for (int64_t k = 0; k < kc; ++k) COLUMN(M, k)                                                   \
    if (last && (s || b)) { /* sum · s + b, one rounding with both (as panel.c's): never left to contraction */ \
      const vec s0 = s ? vload_part(s, n0) : vzero(), s1 = s ? vload_part(s + VEC, n1) : vzero();   \
      const vec c0 = b ? vload_part(b, n0) : vzero(), c1 = b ? vload_part(b + VEC, n1) : vzero();   \
      for (int r = 0; r < M; ++r) {                                                                 \
        a0[r] = s && b ? vfma(a0[r], s0, c0) : s ? vmul(a0[r], s0) : vadd(a0[r], c0);               \
        a1[r] = s && b ? vfma(a1[r], s1, c1) : s ? vmul(a1[r], s1) : vadd(a1[r], c1);               \
      }                                                                                             \
    }                                                                                               \
    for (int r = 0; r < M; ++r) {                                                                   \
      if (cols == NR) {                                                                             \
        vstore(y + r * ldy, a0[r]), vstore(y + r * ldy + VEC, a1[r]);                               \
      } else {                                                                                      \
        float tmp[NR];                                                                              \
        vstore(tmp, a0[r]), vstore(tmp + VEC, a1[r]);                                               \
        for (int c = 0; c < cols; ++c) y[r * ldy + c] = tmp[c];                                     \
      }                                                                                             \
    }                                                                                               \
  }
MICRO(1)
MICRO(2)
MICRO(3)
MICRO(4)
MICRO(5)
MICRO(6)
typedef void (*micro_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t, int, int, int,
                         const float *, const float *);
static const micro_fn MICRO_BY_ROWS[MR + 1] = {0, micro_1, micro_2, micro_3, micro_4, micro_5, micro_6};

/* A thread's panel memory, kept between calls and freed when the thread ends (a program that calls the kernels
 * from short-lived threads would otherwise keep every ended thread's, OpenMP's team included). */
typedef struct {
  float *gemm;    /* KC × NC fp32: `gemm_panels` */
  float *lanes;   /* `lanes_held` columns × NR fp32: `lanes_panel` */
  int64_t lanes_held;
} panel_mem;
static pthread_key_t panel_mem_key;
static pthread_once_t panel_mem_once = PTHREAD_ONCE_INIT;
static int panel_mem_keyed; /* 1 once the key exists */
static _Thread_local panel_mem *panel_unkeyed; /* where pthread_key_create failed: kept for good, as before */

static void panel_mem_free(void *p) { /* at the thread's end (the key's value reads NULL from then on) */
  panel_mem *s = (panel_mem *)p;
  free(s->gemm);
  free(s->lanes);
  free(s);
}
static void panel_mem_key_make(void) { panel_mem_keyed = pthread_key_create(&panel_mem_key, panel_mem_free) == 0; }

/* The calling thread's panel memory (NULL where it cannot be allocated). */
static panel_mem *my_panel_mem(void) {
  pthread_once(&panel_mem_once, panel_mem_key_make);
  panel_mem *s = panel_mem_keyed ? (panel_mem *)pthread_getspecific(panel_mem_key) : panel_unkeyed;
  if (!s) {
    s = (panel_mem *)calloc(1, sizeof(panel_mem));
    if (s && panel_mem_keyed)
      pthread_setspecific(panel_mem_key, s);
    else
      panel_unkeyed = s;
  }
  return s;
}

/* The packed panels of the calling thread (KC × NC fp32), kept between calls. */
static float *gemm_panels(void) {
  panel_mem *s = my_panel_mem();
  if (s && !s->gemm) s->gemm = aligned_alloc(64, (size_t)KC * NC * sizeof(float));
  return s ? s->gemm : NULL;
}

#define GEMM(NAME, T)                                                                              \
  static int NAME##_gemm(const float *x, const T *w, const float *s, const float *b, float *y,     \
                         int64_t n, int64_t in, int64_t out, int threads) {                         \
    if (n < 1 || in < 1 || out < 1) return 1;                                                      \
    if (threads < 1) threads = 1;                                                                  \
    int failed = 0;                                                                                \
    _Pragma("omp parallel num_threads(threads) reduction(|: failed)") {                           \
      int t = 0, nt = 1;                                                                           \
      THREAD_IDS(t, nt);                                                                           \
      const int64_t per = ((out + nt - 1) / nt + NR - 1) / NR * NR; /* whole panels each */        \
      const int64_t t0 = t * per, t1 = t0 + per < out ? t0 + per : out;                            \
      float *p = t0 < t1 ? gemm_panels() : NULL;                                                   \
      if (t0 < t1 && !p) failed = 1;                                                               \
      for (int64_t o0 = t0; p && o0 < t1; o0 += NC) {                                              \
        const int64_t o1 = o0 + NC < t1 ? o0 + NC : t1, nc = (o1 - o0 + NR - 1) / NR * NR;         \
        const int64_t blocks = (in + KC - 1) / KC, step = (in + blocks - 1) / blocks; /* equal blocks */ \
        for (int64_t k0 = 0; k0 < in; k0 += step) {                                                \
          const int64_t kc = k0 + step < in ? step : in - k0;                                      \
          NAME##_pack(w, p, in, o1, o0, nc, k0, kc);                                               \
          for (int64_t r0 = 0; r0 < n; r0 += MR) {                                                 \
            const int m = n - r0 < MR ? (int)(n - r0) : MR;                                        \
            for (int64_t j = 0; j < nc; j += NR) {                                                 \
              const int cols = o1 - o0 - j < NR ? (int)(o1 - o0 - j) : NR;                          \
              MICRO_BY_ROWS[m](x + r0 * in + k0, in, p + j * kc, kc, y + r0 * out + o0 + j, out,   \
                               cols, k0 == 0, k0 + kc >= in, s ? s + o0 + j : NULL,                \
                               b ? b + o0 + j : NULL);                                             \
            }                                                                                      \
          }                                                                                        \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    return failed ? 2 : 0;                                                                         \
  }
GEMM(f32, float)
GEMM(bf16, uint16_t)

/* ---- gemv.c's order of additions on this kernel's tiles: the many-row products of decode-time steps ----------
 *
 * A verification or a batch's step multiplies up to 256 rows; past 16 of them this kernel's tiles beat gemv.c's
 * (the demo's layers on AVX2: 1.26× at 24 rows, 1.37× at 64); but a step's token must get the bits of its one-row
 * decode step, which gemv.c sums in another order: per output, VEC partial sums p_j over the columns k ≡ j
 * (mod VEC), each in order, then those VEC sums by vsum, then the columns past the last whole vector one by one.
 * The lane-order tile computes exactly that: VEC passes over a panel (pass j reads columns j, j + VEC, j + 2·VEC
 * …, broadcast x by packed column as in `micro_`), each pass's MR × NR block of partial sums kept aside, then
 * vsum_across them, the tail columns and the bias as gemv.c adds them. Panels hold every column of NR outputs (no
 * KC blocks: a partial sum runs over all of them). */
#define LANES(M)                                                                                   \
  static void lanes_##M(const float *restrict x, int64_t ldx, const float *restrict p, int64_t in,  \
                        float *restrict y, int64_t ldy, int cols, const float *restrict b) {        \
    const int64_t kv = in / VEC * VEC; /* columns summed in vector lanes; the rest one by one */    \
    const int whole = kv == in && cols == NR; /* no column left over, a whole panel: sums straight to y */ \
    vec part[VEC][M][2];                                                                            \
    for (int j = 0; j < VEC; ++j) {                                                                 \
      vec a0[M], a1[M];                                                                             \
      for (int r = 0; r < M; ++r) a0[r] = vzero(), a1[r] = vzero();                                 \
      for (int64_t k = j; k < kv; k += VEC) COLUMN(M, k)                                            \
      for (int r = 0; r < M; ++r) part[j][r][0] = a0[r], part[j][r][1] = a1[r];                     \
    }                                                                                               \
    for (int r = 0; r < M; ++r) {                                                                   \
      float sums[NR];                                                                               \
      for (int h = 0; h < 2; ++h) {                                                                 \
        vec lanes[VEC];                                                                             \
        for (int j = 0; j < VEC; ++j) lanes[j] = part[j][r][h];                                     \
        const vec sum = vsum_across(lanes);                                                         \
        if (whole)                                                                                  \
          vstore(y + r * ldy + h * VEC, b ? vadd(sum, vload(b + h * VEC)) : sum);                   \
        else                                                                                        \
          vstore(sums + h * VEC, sum);                                                              \
      }                                                                                             \
      if (whole) continue;                                                                          \
      for (int c = 0; c < cols; ++c) {                                                              \
        float sum = sums[c];                                                                        \
        for (int64_t kk = kv; kk < in; ++kk) sum = tail_fma(p[kk * NR + c], x[r * ldx + kk], sum);  \
        y[r * ldy + c] = b ? sum + b[c] : sum;                                                      \
      }                                                                                             \
    }                                                                                               \
  }
LANES(1)
LANES(2)
LANES(3)
LANES(4)
LANES(5)
LANES(6)
typedef void (*lanes_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t, int, const float *);
static const lanes_fn LANES_BY_ROWS[MR + 1] = {0, lanes_1, lanes_2, lanes_3, lanes_4, lanes_5, lanes_6};

/* The calling thread's panel of NR outputs over `in` columns (grown as needed, kept between calls). */
static float *lanes_panel(int64_t in) {
  panel_mem *s = my_panel_mem();
  if (!s) return NULL;
  if (in > s->lanes_held) {
    free(s->lanes);
    s->lanes = aligned_alloc(64, (size_t)((in * NR * sizeof(float) + 63) / 64 * 64));
    s->lanes_held = s->lanes ? in : 0;
  }
  return s->lanes;
}

/* Thread t of nt: its share of the outputs (whole panels), every row of x; where its panel cannot be allocated,
 * gemv.c's kernels compute the share (the same bits, slower). */
#define GEMM_LANES(NAME, T)                                                                        \
  static void NAME##_lanes_span(const float *x, const T *w, const float *b, float *y, int64_t n,    \
                                int64_t in, int64_t out, int t, int nt) {                          \
    const int64_t per = ((out + nt - 1) / nt + NR - 1) / NR * NR; /* whole panels each */          \
    const int64_t t0 = t * per, t1 = t0 + per < out ? t0 + per : out;                              \
    float *p = t0 < t1 ? lanes_panel(in) : NULL;                                                   \
    if (!p && t0 < t1) NAME##_range(x, w, b, y, n, in, out, t0, t1);                               \
    for (int64_t o0 = t0; p && o0 < t1; o0 += NR) {                                                \
      const int cols = t1 - o0 < NR ? (int)(t1 - o0) : NR;                                        \
      NAME##_pack(w, p, in, t1, o0, NR, 0, in);                                                    \
      for (int64_t r0 = 0; r0 < n; r0 += MR) {                                                     \
        const int m = n - r0 < MR ? (int)(n - r0) : MR;                                            \
        LANES_BY_ROWS[m](x + r0 * in, in, p, in, y + r0 * out + o0, out, cols, b ? b + o0 : NULL);  \
      }                                                                                            \
    }                                                                                              \
  }                                                                                                \
  static int NAME##_gemm_lanes(const float *x, const T *w, const float *b, float *y, int64_t n,     \
                               int64_t in, int64_t out, int threads) {                             \
    if (n < 1 || in < 1 || out < 1) return 1;                                                      \
    if (threads < 1) threads = 1;                                                                  \
    _Pragma("omp parallel num_threads(threads)") {                                                \
      int t = 0, nt = 1;                                                                           \
      THREAD_IDS(t, nt);                                                                           \
      NAME##_lanes_span(x, w, b, y, n, in, out, t, nt);                                            \
    }                                                                                              \
    return 0;                                                                                      \
  }
GEMM_LANES(f32, float)
GEMM_LANES(bf16, uint16_t)

/* As twig_gemm, each output summed in twig_gemv's order: the same bits as twig_gemv (any rows, any threads).
 * Returns 0, or 1 on bad sizes. */
int twig_gemm_lanes(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t in, int64_t out,
                    int threads) {
  return f32_gemm_lanes(x, w, b, y, n, in, out, threads);
}

/* As twig_gemm_lanes with w [out, in] in bf16 (raw 16-bit patterns). */
int twig_gemm_lanes_bf16(const float *x, const uint16_t *w, const float *b, float *y, int64_t n, int64_t in,
                         int64_t out, int threads) {
  return bf16_gemm_lanes(x, w, b, y, n, in, out, threads);
}

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]: all contiguous fp32. Returns 0, 1 on bad sizes, 2 where
 * the panels could not be allocated. */
int twig_gemm(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t in, int64_t out,
              int threads) {
  return f32_gemm(x, w, NULL, b, y, n, in, out, threads);
}

/* As twig_gemm with w [out, in] in bf16 (raw 16-bit patterns). */
int twig_gemm_bf16(const float *x, const uint16_t *w, const float *b, float *y, int64_t n, int64_t in, int64_t out,
                   int threads) {
  return bf16_gemm(x, w, NULL, b, y, n, in, out, threads);
}
