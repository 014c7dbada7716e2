/* twigvlm's small-row product for CPU decoding: y[r, o] = sum_k x[r, k] * w[o, k] (+ b[o]), fp32.
 *
 * Decoding and verification multiply 1 to ~8 rows by every weight of the decoder; the product is bound by
 * memory traffic, not arithmetic. Each weight row is read once from memory and used for all the rows of x
 * (which stay in L1/L2), several weight rows at a time so that several streams are in flight. The output range
 * is split evenly over the OpenMP threads (the same libgomp that torch runs on, so no second thread pool).
 * More than 8 rows run as chunks of 8 over tiles of 32 weight rows held in cache (the weights are read once).
 *
 * Built at first use by twigvlm/runtime/native.py with the machine's C compiler (-O3 -march=native -fopenmp).
 */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VEC 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#else /* portable: the compiler vectorises these 8-wide loops where it can */
#define VEC 8
typedef struct { float v[VEC]; } vec;
static inline vec vzero(void) { vec r = {{0}}; return r; }
static inline vec vload(const float *p) { vec r; for (int j = 0; j < VEC; ++j) r.v[j] = p[j]; return r; }
static inline vec vfma(vec a, vec b, vec c) { for (int j = 0; j < VEC; ++j) c.v[j] += a.v[j] * b.v[j]; return c; }
static inline float vsum(vec v) { float s = 0.f; for (int j = 0; j < VEC; ++j) s += v.v[j]; return s; }
#endif

/* N rows of x [N, in] against weight rows o0..o1 of w [out, in], G weight rows at a time (measured on a 2-core
 * AVX2 EPYC: two rows at a time help a single x row a little; from two x rows on, one weight row at a time is
 * fastest, up to 1.4x faster than two or four). */
#define KERNEL(N, G)                                                                               \
  static void rows_##N(const float *restrict x, const float *restrict w, const float *restrict b,  \
                       float *restrict y, int64_t in, int64_t out, int64_t o0, int64_t o1) {       \
    for (int64_t o = o0; o < o1; o += G) {                                                        \
      const int gn = o + G <= o1 ? G : (int)(o1 - o);                                             \
      vec acc[G][N];                                                                              \
      for (int g = 0; g < G; ++g)                                                                 \
        for (int r = 0; r < N; ++r) acc[g][r] = vzero();                                          \
      int64_t k = 0;                                                                              \
      if (gn == G)                                                                                \
        for (; k + VEC <= in; k += VEC)                                                           \
          for (int g = 0; g < G; ++g) {                                                           \
            const vec wv = vload(w + (o + g) * in + k);                                           \
            for (int r = 0; r < N; ++r) acc[g][r] = vfma(wv, vload(x + r * in + k), acc[g][r]);   \
          }                                                                                       \
      for (int g = 0; g < gn; ++g)                                                                \
        for (int r = 0; r < N; ++r) {                                                             \
          float s = vsum(acc[g][r]);                                                              \
          for (int64_t kk = k; kk < in; ++kk) s += w[(o + g) * in + kk] * x[r * in + kk];         \
          y[r * out + o + g] = b ? s + b[o + g] : s;                                              \
        }                                                                                         \
    }                                                                                             \
  }
KERNEL(1, 2)
KERNEL(2, 1)
KERNEL(3, 1)
KERNEL(4, 1)
KERNEL(5, 1)
KERNEL(6, 1)
KERNEL(7, 1)
KERNEL(8, 1)

typedef void (*rows_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t);
#define TILE 32
static const rows_fn BY_ROWS[9] = {0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]: all contiguous fp32. Returns 0, or 1 on bad sizes. */
int twig_gemv(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t in, int64_t out,
              int threads) {
  if (n < 1 || in < 1 || out < 1) return 1;
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t per = ((out + nt - 1) / nt + 15) / 16 * 16; /* whole cache lines of y per thread */
    int64_t o0 = t * per, o1 = o0 + per < out ? o0 + per : out;
    /* a tile of TILE weight rows stays in L2 while every chunk of 8 x rows passes over it: the weights are
       read from memory once however many rows x has */
    for (int64_t t0 = o0; t0 < o1; t0 += TILE) {
      int64_t t1 = t0 + TILE < o1 ? t0 + TILE : o1;
      for (int64_t r0 = 0; r0 < n; r0 += 8) {
        int64_t m = n - r0 < 8 ? n - r0 : 8;
        BY_ROWS[m](x + r0 * in, w, b, y + r0 * out, in, out, t0, t1);
      }
    }
  }
  return 0;
}
