/* twigvlm's int8 products on panel-major weights: y[r, o] = scale[o] * sum_k x[r, k] * q[o, k] (+ b[o]), for any
 * number of rows of x, every output summed in one order.
 *
 * The int8 copy of a weight (twigvlm's own, `runtime/quant.py`) is stored as panels of PW = 64 outputs, column by
 * column: p [ceil(out / PW)][in][PW], the outputs past `out` zero. One column of a panel is one cache line, and a
 * panel is one stream in memory order. A tile of M rows of x by W vectors of a panel's outputs keeps its M · W
 * sums in registers: per column k it widens W vectors of the panel exactly to fp32 and multiplies them by each of
 * the M broadcast x[r, k] — the widening shared by every row, one fused multiply-add per row and weight, where
 * gemv.c's dot products over row-major weights widen per weight row and then reduce across lanes.
 *
 * Each output is one lane of one accumulator summed over k in order from zero, then multiplied by its scale and
 * the bias added: the same arithmetic, in the same order, as gemm.c's many-row product (which reads these panels
 * too). So one row, a verification's few rows, a batch's rows and a prompt's hundreds all give each row the same
 * bits, whatever rows are beside it and whatever the thread count: decoding, drafting and verification share one
 * model bit for bit, and speculation stays exact on int8 weights.
 *
 * Included by layer.c after gemm.c, whose helpers it uses.
 */

#define PW 64 /* outputs per panel (the stored layout: fixed, whatever the vector width) */
#ifndef PFD
#define PFD 64 /* columns (cache lines of a panel) prefetched ahead: 4 KiB */
#endif
#define UNIT 16       /* outputs per unit of work among threads (a quarter panel) */
#if VEC == 16
#define NREG 32 /* vector registers */
#else
#define NREG 16
#endif

/* M rows of x (row stride ldx) by W vectors of outputs, starting at column p of a panel (column stride PW), over
 * `in` columns: y (row stride ldy) gets the first `cols` ≤ W · VEC outputs, each times its scale s (+ b). */
#define PTILE(M, W)                                                                                \
  static void ptile_##M##_##W(const float *restrict x, int64_t ldx, const int8_t *restrict p,       \
                              int64_t in, float *restrict y, int64_t ldy, int cols,                 \
                              const float *restrict s, const float *restrict b, const int8_t *pf) { \
    vec acc[M][W];                                                                                  \
    for (int r = 0; r < M; ++r)                                                                     \
      for (int j = 0; j < W; ++j) acc[r][j] = vzero();                                              \
    for (int64_t k = 0; k < in; ++k) {                                                              \
      if (pf) __builtin_prefetch(pf + k * PW, 0, 3);                                                 \
      if ((M) * (W) + (M) + 1 <= NREG) { /* W outputs' vectors one at a time: x's broadcasts kept */   \
        vec xb[M];                                                                                  \
        for (int r = 0; r < M; ++r) xb[r] = vset1(x[r * ldx + k]);                                  \
        for (int j = 0; j < W; ++j) {                                                               \
          const vec w = vload_i8(p + k * PW + j * VEC);                                             \
          for (int r = 0; r < M; ++r) acc[r][j] = vfma(xb[r], w, acc[r][j]);                       \
        }                                                                                           \
      } else { /* the W widened vectors kept, x broadcast one row at a time */                     \
        vec w[W];                                                                                   \
        for (int j = 0; j < W; ++j) w[j] = vload_i8(p + k * PW + j * VEC);                          \
        for (int r = 0; r < M; ++r) {                                                               \
          const vec xr = vset1(x[r * ldx + k]);                                                     \
          for (int j = 0; j < W; ++j) acc[r][j] = vfma(xr, w[j], acc[r][j]);                        \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
    for (int j = 0; j < W; ++j) {                                                                   \
      const int n = cols - j * VEC < VEC ? cols - j * VEC : VEC; /* valid outputs in vector j */    \
      if (n <= 0) break;                                                                            \
      const vec sv = n == VEC ? vload(s + j * VEC) : vload_part(s + j * VEC, n);                    \
      const vec bv = !b ? vzero() : n == VEC ? vload(b + j * VEC) : vload_part(b + j * VEC, n);     \
      for (int r = 0; r < M; ++r) { /* sum · s + b in one rounding (as gemm.c's) */                \
        const vec v = b ? vfma(acc[r][j], sv, bv) : vmul(acc[r][j], sv);                            \
        if (n == VEC) {                                                                             \
          vstore(y + r * ldy + j * VEC, v);                                                         \
        } else {                                                                                    \
          float tmp[VEC];                                                                           \
          vstore(tmp, v);                                                                           \
          for (int c = 0; c < n; ++c) y[r * ldy + j * VEC + c] = tmp[c];                            \
        }                                                                                           \
      }                                                                                             \
    }                                                                                               \
  }
typedef void (*ptile_fn)(const float *, int64_t, const int8_t *, int64_t, float *, int64_t, int, const float *,
                         const float *, const int8_t *);

/* Tiles by rows of x (1-6) and vectors of outputs (PWIDE: the widest W for M rows, narrower ones for a span's
 * remainder). With AVX2's 16 registers, measured on a 2-core AVX2 EPYC with a panel in cache (share of the FMA
 * units' rate): 1 × 8 vectors 47-52%, 2 × 4 63-69%, 3 × 4 73-82% (its 12 sums, 3 broadcasts and one widened
 * vector fill the 16 registers exactly), 4 × 2 68-93%, 6 × 2 79-87%; with weights from memory a tile narrower than
 * a panel reads it in several passes, so 3 × 4 is the cheapest per row there (3 rows 1.6× one row's time, 4 rows as
 * 4 × 2 2.3×; as 2 + 2 or 3 + 1 no better). AVX-512's 32 registers hold a whole panel (4 vectors) for up to 6
 * rows; unmeasured. */
#define PTILES(M) PTILE(M, 1) PTILE(M, 2) PTILE(M, 4) PTILE(M, 8)
PTILES(1)
PTILES(2)
PTILES(3)
PTILES(4)
PTILES(5)
PTILES(6)
#define PROW(M) {0, ptile_##M##_1, ptile_##M##_2, 0, ptile_##M##_4, 0, 0, 0, ptile_##M##_8}
static const ptile_fn PTILE_BY[7][9] = {{0}, PROW(1), PROW(2), PROW(3), PROW(4), PROW(5), PROW(6)};
#define PMR 6 /* rows of x per tile at most */
#if VEC == 16
static const int PWIDE[PMR + 1] = {0, 4, 4, 4, 4, 4, 4}; /* 4 vectors: a whole panel */
#else
static const int PWIDE[PMR + 1] = {0, 8, 4, 4, 2, 2, 2};
#endif

/* Outputs [u0, u1) (multiples of UNIT, or u1 = out) of all n rows: panel by panel, rows in tiles of ≤ PMR, each
 * panel's span in tiles of the widest W that fits (the span's columns read from cache after the first tile). */
static void i8p_range(const float *x, const int8_t *p, const float *s, const float *b, float *y, int64_t n,
                      int64_t in, int64_t out, int64_t u0, int64_t u1) {
  for (int64_t o = u0; o < u1;) {
    const int64_t panel = o / PW, end = (panel + 1) * PW < u1 ? (panel + 1) * PW : u1;
    const int8_t *pp = p + panel * in * PW;
    const int64_t tiles = (n + PMR - 1) / PMR; /* rows split evenly: 8 as 4 + 4, not 6 + 2 */
    for (int64_t r0 = 0, t = 0; r0 < n; ++t) {
      const int m = (int)((n - r0) / (tiles - t));
      for (int64_t c = o, tile = 0; c < end; ++tile) {
        int wv = PWIDE[m];
        const int64_t left = (end - c + VEC - 1) / VEC, room = (PW - c % PW) / VEC; /* vectors to do, in panel */
        while (wv > left || wv > room) wv /= 2;
        const int cols = end - c < wv * VEC ? (int)(end - c) : wv * VEC;
        /* the first tile reads the panel from memory, prefetching PFD columns ahead (one row: 1.06-1.2× against
         * the hardware's prefetch alone, in a noisy spell); the second prefetches the next panel while the rest
         * run from cache (spreading that over all the later tiles measured no better) */
        const int8_t *pf = r0 || tile > 1 ? NULL : tile == 0 ? pp + c % PW + PFD * PW : pp + in * PW;
        PTILE_BY[m][wv](x + r0 * in, in, pp + c % PW, in, y + r0 * out + c, out, cols, s + c, b ? b + c : NULL,
                        pf);
        c += wv * VEC;
      }
      r0 += m;
    }
    o = end;
  }
}

/* Thread t of nt: its share of the outputs, whole units each. */
static void i8p_span(const float *x, const int8_t *p, const float *s, const float *b, float *y, int64_t n,
                     int64_t in, int64_t out, int t, int nt) {
  const int64_t units = (out + UNIT - 1) / UNIT, per = (units + nt - 1) / nt;
  const int64_t u0 = t * per * UNIT, u1 = (t + 1) * per * UNIT < out ? (t + 1) * per * UNIT : out;
  if (u0 < u1) i8p_range(x, p, s, b, y, n, in, out, u0, u1);
}

/* gemm.c's copy of weight rows o0 .. o0 + nc (nc a multiple of NR), columns k0 .. k0 + kc, from stored int8
 * panels into fp32 panels d [nc / NR][kc][NR]: NR consecutive int8 of a column widened at a time (the stored
 * panels' padding supplies the zeros past `out`). */
static void i8p_pack(const int8_t *w, float *d, int64_t in, int64_t out, int64_t o0, int64_t nc, int64_t k0,
                     int64_t kc) {
  (void)out;
  for (int64_t j = 0; j < nc; j += NR) {
    const int8_t *src = w + (o0 + j) / PW * in * PW + k0 * PW + (o0 + j) % PW;
    float *dst = d + (j / NR) * kc * NR;
    for (int64_t k = 0; k < kc; ++k)
      for (int v = 0; v < NR; v += VEC) vstore(dst + k * NR + v, vload_i8(src + k * PW + v));
  }
}
GEMM(i8p, int8_t)

/* w [out, in] bf16 bits = q · scale[row] rounded to bf16, q read from its panels p [ceil(out / PW)][in][PW]: in one
 * pass what torch computes in three (widen to fp32, multiply by the row's scale, round to bf16), with the same
 * result bit for bit (each element is its own product and rounding). A prompt's prefill multiplies by the int8
 * weights this way on bf16-native CPUs (`quant.dequantize`). Panel by panel, eight columns at a time with AVX2 (a
 * transpose of each 8 × 8 block), else VEC columns widened into a block of the panel's rows (in L1), then each
 * row's values scaled, rounded and stored whole.
 * Returns 0, or 1 on bad sizes. */
int twig_dequant_bf16(const int8_t *p, const float *scale, uint16_t *w, int64_t out, int64_t in, int threads) {
  if (out < 1 || in < 1) return 1;
  if (threads < 1) threads = 1;
  const int64_t panels = (out + PW - 1) / PW;
  _Pragma("omp parallel for num_threads(threads) schedule(static)")
  for (int64_t i = 0; i < panels; ++i) {
    const int8_t *pp = p + i * in * PW;
    const int64_t o0 = i * PW, rows = out - o0 < PW ? out - o0 : PW;
    float block[PW][VEC]; /* [row of the panel][column]: VEC columns */
    int64_t k = 0;
#if PACK8 /* eight columns at a time: each eight rows' values widened, transposed into rows, rounded, stored */
    for (; k + 8 <= in; k += 8)
      for (int64_t j = 0; j < rows; j += 8) {
        __m256 r[8];
        for (int c = 0; c < 8; ++c)
          r[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(pp + (k + c) * PW + j))));
        transpose8(r); /* r[l]: row j + l, columns k .. k + 7 */
        for (int l = 0; l < 8 && j + l < rows; ++l)
          store_bf16x8(w + (o0 + j + l) * in + k, _mm256_mul_ps(r[l], _mm256_set1_ps(scale[o0 + j + l])));
      }
#endif
    for (; k + VEC <= in; k += VEC) {
      for (int c = 0; c < VEC; ++c)
        for (int j = 0; j < PW; ++j) block[j][c] = (float)pp[(k + c) * PW + j];
      for (int64_t j = 0; j < rows; ++j)
        store_bf16(w + (o0 + j) * in + k, vmul(vload(block[j]), vset1(scale[o0 + j])));
    }
    for (; k < in; ++k)
      for (int64_t j = 0; j < rows; ++j) w[(o0 + j) * in + k] = to_bf16((float)pp[k * PW + j] * scale[o0 + j]);
  }
  return 0;
}

/* x [n, in] fp32, p [ceil(out / PW)][in][PW] int8 (panels), s [out] fp32, b [out] fp32 or NULL, y [n, out] fp32.
 * Returns 0, or 1 on bad sizes. */
int twig_panel_i8(const float *x, const int8_t *p, const float *s, const float *b, float *y, int64_t n, int64_t in,
                  int64_t out, int threads) {
  if (n < 1 || in < 1 || out < 1) return 1;
  if (threads < 1) threads = 1;
  _Pragma("omp parallel num_threads(threads)") {
    int t = 0, nt = 1;
    THREAD_IDS(t, nt);
    i8p_span(x, p, s, b, y, n, in, out, t, nt);
  }
  return 0;
}

/* As twig_panel_i8 on gemm.c's many-row kernel (a prompt's rows), the same sums: 0, 1 on bad sizes, 2 where its
 * panels could not be allocated. */
int twig_gemm_i8(const float *x, const int8_t *p, const float *s, const float *b, float *y, int64_t n, int64_t in,
                 int64_t out, int threads) {
  return i8p_gemm(x, p, s, b, y, n, in, out, threads);
}
