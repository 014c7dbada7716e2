/* twigvlm's small-row products for CPU decoding: y[r, o] = sum_k x[r, k] * w[o, k] (+ b[o]).
 *
 * Decoding and verification multiply 1 to ~8 rows by every weight of the decoder; the product is bound by
 * memory traffic, not arithmetic. Each weight row is read once from memory and used for all the rows of x
 * (which stay in L1/L2), several weight rows at a time so that several streams are in flight. The output range
 * is split evenly over the OpenMP threads (the same libgomp that torch runs on, so no second thread pool).
 * More than 8 rows run as chunks of 8 over tiles of 32 weight rows held in cache (the weights are read once).
 * Each kernel also prefetches a later group's weight rows as it reads the current ones.
 *
 * Two weight formats, one loop: fp32 (`twig_gemv`) and bf16 (`twig_gemv_bf16`: the top half of an fp32, widened
 * exactly); x, y, b and the accumulation are fp32 in both. (int8 weights are stored panel by panel and multiplied
 * by panel.c.) The file also holds the vector helpers the other kernels share.
 *
 * Built at first use by twigvlm/runtime/native.py with the machine's C compiler (-O3 -march=native -fopenmp).
 */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__AVX512F__) && defined(__AVX512BW__) && !defined(TWIG_NO_AVX512)) || \
    (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
/* The sum of eight lanes as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): the order vsum8 sums each of its
 * eight vectors in, so an output gets the same bits from a one-row product (vsum8) as from a product of several
 * rows (vsum) — what keeps speculation's verification and a batch's rows equal to one-row decoding. */
static inline float sum8(__m256 v) {
  const __m256 t = _mm256_hadd_ps(v, v), u = _mm256_hadd_ps(t, t); /* lanes 0 and 4: the two halves' sums */
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(TWIG_NO_AVX512)
#define VEC 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline vec vload_i8(const int8_t *p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline __m256 fold(vec v) { /* 16 lanes → 8: low half + high half */
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
static inline float vsum(vec v) { return sum8(fold(v)); }
#define HSUM8 1
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vload_bf16(const uint16_t *p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline vec vload_i8(const int8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline __m256 fold(vec v) { return v; }
static inline float vsum(vec v) { return sum8(v); }
#define HSUM8 1
#else /* portable: the compiler vectorises these 8-wide loops where it can */
#define VEC 8
typedef struct { float v[VEC]; } vec;
static inline vec vzero(void) { vec r = {{0}}; return r; }
static inline vec vload(const float *p) { vec r; for (int j = 0; j < VEC; ++j) r.v[j] = p[j]; return r; }
static inline vec vload_f32(const float *p) { return vload(p); }
static inline float bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)h << 16;
  return c.f;
}
static inline vec vload_bf16(const uint16_t *p) { vec r; for (int j = 0; j < VEC; ++j) r.v[j] = bf16_to_f32(p[j]); return r; }
static inline vec vload_i8(const int8_t *p) { vec r; for (int j = 0; j < VEC; ++j) r.v[j] = (float)p[j]; return r; }
static inline vec vfma(vec a, vec b, vec c) { for (int j = 0; j < VEC; ++j) c.v[j] += a.v[j] * b.v[j]; return c; }
static inline float vsum(vec v) { float s = 0.f; for (int j = 0; j < VEC; ++j) s += v.v[j]; return s; }
#endif

/* lane-wise operations beyond the products' (the layers' attention and activations, the bf16 rounding), per
 * instruction set */
#if VEC == 16 && defined(__AVX512F__)
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset1(float a) { return _mm512_set1_ps(a); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
#elif VEC == 8 && defined(__AVX2__)
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset1(float a) { return _mm256_set1_ps(a); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
#else
static inline void vstore(float *p, vec v) { for (int j = 0; j < VEC; ++j) p[j] = v.v[j]; }
static inline vec vset1(float a) { vec r; for (int j = 0; j < VEC; ++j) r.v[j] = a; return r; }
static inline vec vadd(vec a, vec b) { for (int j = 0; j < VEC; ++j) a.v[j] += b.v[j]; return a; }
static inline vec vsub(vec a, vec b) { for (int j = 0; j < VEC; ++j) a.v[j] -= b.v[j]; return a; }
static inline vec vmul(vec a, vec b) { for (int j = 0; j < VEC; ++j) a.v[j] *= b.v[j]; return a; }
static inline vec vdiv(vec a, vec b) { for (int j = 0; j < VEC; ++j) a.v[j] /= b.v[j]; return a; }
#endif

/* The eight sums of a[0..7] at once (a transposing tree of pairwise adds: one store for eight rows instead of
 * eight horizontal reductions — a one-row product spends as long on those as on short weight rows). */
static inline void vsum8(const vec *a, float *out) {
#ifdef HSUM8
  const __m256 t0 = _mm256_hadd_ps(fold(a[0]), fold(a[1])), t1 = _mm256_hadd_ps(fold(a[2]), fold(a[3]));
  const __m256 t2 = _mm256_hadd_ps(fold(a[4]), fold(a[5])), t3 = _mm256_hadd_ps(fold(a[6]), fold(a[7]));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  for (int g = 0; g < 8; ++g) out[g] = vsum(a[g]);
#endif
}

/* vsum across vectors: lane c of the result is vsum of the VEC values p[0..VEC)[c], added in vsum's order (the
 * AVX-512 fold, then sum8's tree; the portable build's left-to-right sum from zero). gemm.c's lane-order tiles
 * reduce VEC partial sums per output with it, so an output gets the bits the kernels here give it. */
static inline vec vsum_across(const vec *p) {
#if VEC == 16 && defined(HSUM8)
  vec q[8];
  for (int j = 0; j < 8; ++j) q[j] = _mm512_add_ps(p[j], p[j + 8]);
#elif defined(HSUM8)
  const vec *q = p;
#endif
#ifdef HSUM8
  return vadd(vadd(vadd(q[0], q[1]), vadd(q[2], q[3])), vadd(vadd(q[4], q[5]), vadd(q[6], q[7])));
#else
  vec s = vzero();
  for (int j = 0; j < VEC; ++j) s = vadd(s, p[j]);
  return s;
#endif
}

/* acc + w·x in one rounding: a product's columns past its last whole vector, added one by one — always fused,
 * never left to the compiler's contraction (which may differ between two loops), so gemm.c's lane-order tiles
 * add them exactly as the kernels here do. */
static inline float tail_fma(float w, float x, float acc) { return __builtin_fmaf(w, x, acc); }

static inline float scalar_f32(const float *w, int64_t i) { return w[i]; }
static inline float scalar_bf16(const uint16_t *w, int64_t i) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)w[i] << 16;
  return c.f;
}

/* How many groups ahead a kernel of N rows of x prefetches the weight rows it will read (at the same offset k):
 * the hardware prefetcher alone leaves a group of weight rows waiting on memory, worst where every weight row
 * serves many rows of x (measured on a 2-core AVX-512 EPYC, weights cold: 8 rows of x 1.3× faster over the demo's
 * layers and 2.5× over its LM head; 2 and 4 rows 1.2×; from 5 rows on, 4 groups ahead beat 1 and 2). */
#define AHEAD(N) ((N) <= 4 ? 1 : 4)

/* N rows of x [N, in] against weight rows o0..o1 of w [out, in] (type T, widened by LOAD/SCALAR), G weight rows
 * at a time. */
#define KERNEL(NAME, T, N, G)                                                                      \
  static void NAME##_##N(const float *restrict x, const T *restrict w, const float *restrict b,    \
                         float *restrict y, int64_t in, int64_t out,                                \
                         int64_t o0, int64_t o1) {                                                  \
    for (int64_t o = o0; o < o1; o += G) {                                                        \
      const int gn = o + G <= o1 ? G : (int)(o1 - o);                                             \
      vec acc[G][N];                                                                              \
      for (int g = 0; g < G; ++g)                                                                 \
        for (int r = 0; r < N; ++r) acc[g][r] = vzero();                                          \
      int64_t k = 0;                                                                              \
      if (gn == G)                                                                                \
        for (; k + VEC <= in; k += VEC) {                                                         \
          for (int g = 0; g < G; ++g) {                                                           \
            if (o + AHEAD(N) * G + g < out) /* a later group's rows */                            \
              __builtin_prefetch(w + (o + AHEAD(N) * G + g) * in + k, 0, 0);                      \
            const vec wv = vload_##NAME(w + (o + g) * in + k);                                    \
            for (int r = 0; r < N; ++r) acc[g][r] = vfma(wv, vload(x + r * in + k), acc[g][r]);   \
          }                                                                                       \
        }                                                                                         \
      else /* a short group at the end: the same sums, fewer rows (never the scalar loop's order) */ \
        for (; k + VEC <= in; k += VEC)                                                           \
          for (int g = 0; g < gn; ++g) {                                                          \
            const vec wv = vload_##NAME(w + (o + g) * in + k);                                    \
            for (int r = 0; r < N; ++r) acc[g][r] = vfma(wv, vload(x + r * in + k), acc[g][r]);   \
          }                                                                                       \
      const int tree = N == 1 && G == 8 && gn == G; /* a full group of one row: the add tree */   \
      float sums[8];                                                                              \
      if (tree) {                                                                                 \
        vec row[8];                                                                               \
        for (int g = 0; g < 8; ++g) row[g] = acc[g][0];                                           \
        vsum8(row, sums);                                                                         \
      }                                                                                           \
      for (int g = 0; g < gn; ++g)                                                                \
        for (int r = 0; r < N; ++r) {                                                             \
          float sum = tree ? sums[g] : vsum(acc[g][r]);                                           \
          for (int64_t kk = k; kk < in; ++kk)                                                     \
            sum = tail_fma(scalar_##NAME(w, (o + g) * in + kk), x[r * in + kk], sum);              \
          y[r * out + o + g] = b ? sum + b[o + g] : sum;                                          \
        }                                                                                         \
    }                                                                                             \
  }

#define FORMAT(NAME, T, G1, G2, G3, G4, G5)                                                        \
  KERNEL(NAME, T, 1, G1)                                                                           \
  KERNEL(NAME, T, 2, G2)                                                                           \
  KERNEL(NAME, T, 3, G3)                                                                           \
  KERNEL(NAME, T, 4, G4)                                                                           \
  KERNEL(NAME, T, 5, G5)                                                                           \
  KERNEL(NAME, T, 6, G5)                                                                           \
  KERNEL(NAME, T, 7, G5)                                                                           \
  KERNEL(NAME, T, 8, G5)                                                                           \
  typedef void (*NAME##_fn)(const float *, const T *, const float *, float *, int64_t, int64_t, int64_t, \
                            int64_t);                                                              \
  static const NAME##_fn NAME##_BY_ROWS[9] = {0,         NAME##_1, NAME##_2, NAME##_3, NAME##_4,   \
                                              NAME##_5,  NAME##_6, NAME##_7, NAME##_8};            \
  /* outputs o0 .. o1 for every row of x: a tile of TILE weight rows stays in L2 while every chunk of 8 x rows \
   * passes over it */                                                                           \
  static void NAME##_range(const float *x, const T *w, const float *b, float *y,                   \
                           int64_t n, int64_t in, int64_t out, int64_t o0, int64_t o1) {          \
    for (int64_t t0 = o0; t0 < o1; t0 += TILE) {                                                  \
      int64_t t1 = t0 + TILE < o1 ? t0 + TILE : o1;                                               \
      for (int64_t r0 = 0; r0 < n; r0 += 8) {                                                     \
        int64_t m = n - r0 < 8 ? n - r0 : 8;                                                      \
        NAME##_BY_ROWS[m](x + r0 * in, w, b, y + r0 * out, in, out, t0, t1);                      \
      }                                                                                           \
    }                                                                                             \
  }                                                                                               \
  /* thread t of nt computes its share of the output range (whole cache lines of y each) */        \
  static void NAME##_span(const float *x, const T *w, const float *b, float *y,                    \
                          int64_t n, int64_t in, int64_t out, int t, int nt) {                     \
    int64_t per = ((out + nt - 1) / nt + 15) / 16 * 16;                                           \
    int64_t o0 = t * per, o1 = o0 + per < out ? o0 + per : out;                                   \
    NAME##_range(x, w, b, y, n, in, out, o0, o1);                                                 \
  }                                                                                               \
  static int NAME##_product(const float *x, const T *w, const float *b, float *y,                  \
                            int64_t n, int64_t in, int64_t out, int threads) {                     \
    if (n < 1 || in < 1 || out < 1) return 1;                                                     \
    if (threads < 1) threads = 1;                                                                 \
    _Pragma("omp parallel num_threads(threads)") {                                                \
      int t = 0, nt = 1;                                                                          \
      THREAD_IDS(t, nt);                                                                          \
      NAME##_span(x, w, b, y, n, in, out, t, nt);                                                 \
    }                                                                                             \
    return 0;                                                                                     \
  }

#ifdef _OPENMP
#define THREAD_IDS(t, nt) (t = omp_get_thread_num(), nt = omp_get_num_threads())
#else
#define THREAD_IDS(t, nt) ((void)0)
#endif
#define TILE 32

/* Weight rows at a time for 1, 2, 3, 4 and 5-8 rows of x. One row needs eight independent sums to hide the
 * FMA latency (measured on a 2-core AVX-512 EPYC: 8 > 4 > 2 rows at a time, in every format); two to four rows
 * of x take one weight row at a time; five to eight take two with AVX-512, which halves the loads of x per
 * product (8 rows of the demo's layers, weights cold: int8 1.25×, fp32 1.05×). Their 16 sums need AVX-512's 32
 * vector registers: with AVX2's 16 they spill (8 rows 1.5× slower), so there five to eight take one too; three
 * weight rows at a time run out of registers even with AVX-512. A group must divide TILE: a short group (at the
 * end of a shape whose size is not a multiple of it) runs the same vector loop over its rows. Which weight rows
 * share a group never changes a sum (each is its own accumulator, over the same steps in the same order). */
#if VEC == 16
#define MANY 2
#else
#define MANY 1
#endif
#ifndef GF32
#define GF32 8, 1, 1, 1, MANY
#define GBF16 8, 1, 1, 1, MANY
#endif
#define EXPAND(...) FORMAT(__VA_ARGS__)
EXPAND(f32, float, GF32)
EXPAND(bf16, uint16_t, GBF16)

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]: all contiguous fp32. Returns 0, or 1 on bad sizes. */
int twig_gemv(const float *x, const float *w, const float *b, float *y, int64_t n, int64_t in, int64_t out,
              int threads) {
  return f32_product(x, w, b, y, n, in, out, threads);
}

/* As twig_gemv with w [out, in] in bf16 (raw 16-bit patterns). */
int twig_gemv_bf16(const float *x, const uint16_t *w, const float *b, float *y, int64_t n, int64_t in,
                   int64_t out, int threads) {
  return bf16_product(x, w, b, y, n, in, out, threads);
}

/* float → bf16 bits, rounded to nearest even (NaN → the quiet NaN), as torch's float → bfloat16 conversion */
static inline uint16_t to_bf16(float f) {
  union { float f; uint32_t u; } c;
  c.f = f;
  if (f != f) return 0x7FC0;
  return (uint16_t)((c.u + 0x7FFFu + ((c.u >> 16) & 1u)) >> 16);
}

/* Eight lanes of fp32 rounded to bf16 bits (as to_bf16) and stored at out (AVX2, also in AVX-512 builds). */
#if defined(__AVX2__)
static inline void store_bf16x8(uint16_t *out, __m256 f) {
  const __m256i u = _mm256_castps_si256(f), one = _mm256_set1_epi32(1);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
  r = _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08); /* 16-bit lanes 0-7 low */
  _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(packed));
}
#endif

/* A vector's lanes (eight or sixteen) rounded to bf16 bits (as to_bf16) and stored at out. */
#if VEC == 16 && defined(__AVX512F__)
static inline void store_bf16(uint16_t *out, vec f) {
  const __m512i u = _mm512_castps_si512(f), one = _mm512_set1_epi32(1);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
  r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(r));
}
#elif VEC == 8 && defined(__AVX2__)
static inline void store_bf16(uint16_t *out, vec f) { store_bf16x8(out, f); }
#else
static inline void store_bf16(uint16_t *out, vec f) { for (int j = 0; j < VEC; ++j) out[j] = to_bf16(f.v[j]); }
#endif
