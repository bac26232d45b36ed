/* Fused single-pass kernels of the bounded path (id3_callback/native.py compiles and loads this file).

Each replaces a handful of torch ops that would each read (and often write) the whole block: one pass here,
no temporaries. Single-threaded on purpose: no second OpenMP runtime next to torch's, and no barrier to wait
on when other jobs share the CPU (see bounded.THREADS). Built with -ffp-contract=off and without fast-math,
so every float operation is the IEEE one torch performs: the scores are bitwise torch's. The bound branch's
sums (group norms, gathered dot products) are the exception: torch's GEMMs sum in an order of their own,
so those agree with it up to rounding, which bounded.slack covers. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline uint32_t bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

/* Token rows to keep for a layer's products (bounded.live_tokens). Row t is dead when its output-gradient row
   is all +-0 and its input row is all finite (a zero times inf or NaN is NaN: such a row is kept). Returns -1
   (keep all) when fewer than `enough` rows have a zero gradient row, else the number of kept rows written to
   `keep` (ascending; the single row 0 when every row is dead). */
int64_t id3_live_rows(const float *g, int64_t g_stride, int64_t g_cols, const float *h, int64_t h_stride,
                      int64_t h_cols, int64_t tokens, double enough, int64_t *keep) {
    int64_t zero_rows = 0, kept = 0;
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = g + t * g_stride;
        uint32_t any = 0; /* a live row usually shows it in its first strip: stop there */
        for (int64_t j0 = 0; j0 < g_cols && !any; j0 += 64) {
            int64_t j1 = j0 + 64 < g_cols ? j0 + 64 : g_cols;
            for (int64_t j = j0; j < j1; j++) any |= bits(row[j]) & 0x7fffffffu;
        }
        if (any == 0) {
            zero_rows++;
            const float *in = h + t * h_stride;
            uint32_t bad = 0; /* exponent all ones: inf or NaN */
            for (int64_t j = 0; j < h_cols; j++) bad |= (bits(in[j]) & 0x7f800000u) == 0x7f800000u;
            if (!bad) continue; /* dead */
        }
        keep[kept++] = t;
    }
    if ((double)zero_rows < enough) return -1;
    if (kept == 0) keep[kept++] = 0;
    return kept;
}

/* Score a block of gradients like TensorScorer (D3, exp 0 or 1, no loss scale) and keep only the entries that
   can enter a top-k whose k-th value is at least `floor`: eligible (not in `excluded`, sorted block-local
   positions) with score >= floor. Writes (position, score, gradient) of each, in position order, and returns
   their number; -1 when more than `cap` qualify, -2 when any score of the block (excluded entries too) is not
   finite: the caller then scores the block the usual way, which also records the non-finite score. Scores:
   exp 1: |g / (|w| + eps)|, exp 0: |g|, the operations and roundings of scores.d3_scores. */
int64_t id3_score_block(const float *g, const float *w, int64_t n, const int64_t *excluded, int64_t n_excluded,
                        int exp, float eps, float floor, int64_t cap, int64_t *pos, float *score, float *grad) {
    enum { STRIP = 256 };
    float s[STRIP];
    int64_t found = 0, e = 0;
    for (int64_t i0 = 0; i0 < n; i0 += STRIP) {
        int64_t len = n - i0 < STRIP ? n - i0 : STRIP;
        const float *gs = g + i0, *ws = w + i0;
        /* A vectorized pass scores the strip and tells whether any entry reaches the floor or is not finite;
           most strips stop here. */
        if (exp == 0)
            for (int64_t i = 0; i < len; i++) s[i] = __builtin_fabsf(gs[i]);
        else
            for (int64_t i = 0; i < len; i++) s[i] = __builtin_fabsf(gs[i] / (__builtin_fabsf(ws[i]) + eps));
        uint32_t hit = 0, bad = 0;
        for (int64_t i = 0; i < len; i++) {
            hit |= s[i] >= floor;
            bad |= (bits(s[i]) & 0x7f800000u) == 0x7f800000u;
        }
        if (bad) return -2;
        if (!hit) continue;
        for (int64_t i = 0; i < len; i++) {
            if (!(s[i] >= floor)) continue;
            while (e < n_excluded && excluded[e] < i0 + i) e++;
            if (e < n_excluded && excluded[e] == i0 + i) continue;
            if (found == cap) return -1;
            pos[found] = i0 + i;
            score[found] = s[i];
            grad[found] = gs[i];
            found++;
        }
    }
    return found;
}

/* Rows [r0, r1) of the group bound (bounded._block_hits): block-local positions (row-major, ascending) of the
   entries whose bound Σ_g an[g, i]·bn[g, j] may reach the level, written to `pos`; returns their number.
   `an` is G x rows (row stride an_stride), `bn` G x cols contiguous. exp 0: bound >= level; exp 1:
   bound - low·|w| >= level (level = low·eps): the comparisons of the torch code, whose 1e-5 margin covers
   any order of summing the G products. At most 64 groups (else -1, also when out of memory).

   Most entries fail, so each strip of 32 is first tested against the Cauchy-Schwarz bound over the groups,
   Σ_g an[g, i]·bn[g, j] <= ‖an[:, i]‖·‖bn[:, j]‖: one product per entry instead of G. The norms are taken in
   double and rounded up, and the product raised by 1e-4 (relative) and 1e-38 (absolute, for underflow),
   far more than the G-term float sum can exceed the exact one; float rounding is monotone, so an entry
   this test rejects fails the full one too, and the hits are exactly the full test's. */
int64_t id3_bound_hits(const float *an, int64_t an_stride, const float *bn, int64_t groups, int64_t cols,
                       const float *w, int64_t r0, int64_t r1, int exp, float low, float level, int64_t *pos) {
    enum { STRIP = 32, MAX_GROUPS = 64 }; /* STRIP: 4 AVX registers of sums, kept across the G products */
    float peak[MAX_GROUPS];
    int64_t found = 0;
    if (groups > MAX_GROUPS) return -1;
    for (int64_t g = 0; g < groups; g++) {
        float m = 0.0f;
        for (int64_t j = 0; j < cols; j++) m = bn[g * cols + j] > m ? bn[g * cols + j] : m;
        peak[g] = m;
    }
    float *col_norm = malloc(sizeof(float) * (size_t)(cols > 0 ? cols : 1));
    if (col_norm == NULL) return -1;
    for (int64_t j = 0; j < cols; j++) {
        double sq = 0.0;
        for (int64_t g = 0; g < groups; g++) sq += (double)bn[g * cols + j] * bn[g * cols + j];
        col_norm[j] = (float)(sqrt(sq) * (1.0 + 1e-6));
    }
    for (int64_t i = r0; i < r1; i++) {
        /* No entry of row i can reach the level when Σ_g an[g, i]·max_j bn[g, j] (>= each bound, and the
           bound minus low·|w| is not larger) stays below it by more than its rounding: skip the row unread. */
        float row_peak = 0.0f;
        for (int64_t g = 0; g < groups; g++) row_peak += an[g * an_stride + i] * peak[g];
        if (row_peak * 1.0001f < level) continue;
        const float *wr = w + i * cols;
        int64_t base = (i - r0) * cols;
        double row_sq = 0.0;
        for (int64_t g = 0; g < groups; g++) row_sq += (double)an[g * an_stride + i] * an[g * an_stride + i];
        float row_norm = (float)(sqrt(row_sq) * (1.0 + 1e-6));
        for (int64_t j0 = 0; j0 < cols; j0 += STRIP) {
            int64_t len = cols - j0 < STRIP ? cols - j0 : STRIP;
            uint32_t may = 0; /* NaN or inf norms compare false below: such strips take the full test */
            for (int64_t j = 0; j < len; j++) {
                float pre = row_norm * col_norm[j0 + j] * 1.0001f + 1e-38f;
                if (exp == 1) pre -= low * __builtin_fabsf(wr[j0 + j]);
                may |= !(pre < level);
            }
            if (!may) continue;
            float acc[STRIP] = {0};
            if (len == STRIP) {
                for (int64_t g = 0; g < groups; g++) {
                    float x = an[g * an_stride + i];
                    const float *row = bn + g * cols + j0;
                    for (int64_t j = 0; j < STRIP; j++) acc[j] += x * row[j];
                }
            } else {
                for (int64_t g = 0; g < groups; g++) {
                    float x = an[g * an_stride + i];
                    const float *row = bn + g * cols + j0;
                    for (int64_t j = 0; j < len; j++) acc[j] += x * row[j];
                }
            }
            if (exp == 1)
                for (int64_t j = 0; j < len; j++) acc[j] -= low * __builtin_fabsf(wr[j0 + j]);
            uint32_t hit = 0;
            for (int64_t j = 0; j < len; j++) hit |= acc[j] >= level;
            if (!hit) continue;
            for (int64_t j = 0; j < len; j++)
                if (acc[j] >= level) pos[found++] = base + j0 + j;
        }
    }
    free(col_norm);
    return found;
}

/* Σ_t x[t]·y[t] over contiguous rows, in a fixed order: 32 running sums (4 AVX registers, independent
   chains), then the sums added pairwise. Another order than sampled_addmm's or a GEMM's, so a value can
   differ from theirs in the last bits; the bound's slack covers any order (bounded.slack). */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float dot(const float *x, const float *y, int64_t n) {
    v8 acc[4] = {{0}};
    int64_t t = 0;
    for (; t + 32 <= n; t += 32)
        for (int k = 0; k < 4; k++) acc[k] += load8(x + t + 8 * k) * load8(y + t + 8 * k);
    float tail[32] = {0};
    for (int k = 0; t + k < n; k++) tail[k] = x[t + k] * y[t + k];
    for (int k = 0; k < 4; k++) acc[k] += load8(tail + 8 * k);
    v8 sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    float lanes[8];
    memcpy(lanes, &sum, sizeof lanes);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

/* (aᵀb)[rows[p], cols[p]] for n pairs in any order (bounded.sampled_products): one `dot` over the T tokens
   per pair. The caller passes the transposes, contiguous: a_t (R x T) and b_t (C x T), the columns of a and b
   as rows, so each pair reads two contiguous runs. Each value depends only on its own pair. */
void id3_gathered_dots(const float *a_t, const float *b_t, int64_t tokens, const int64_t *rows,
                       const int64_t *cols, int64_t n, float *out) {
    for (int64_t p = 0; p < n; p++) out[p] = dot(a_t + rows[p] * tokens, b_t + cols[p] * tokens, tokens);
}

/* out (n x T, contiguous) = a[:, idx]ᵀ for a (T x C, row stride a_stride): the columns that gathered dot
   products read, as contiguous rows (a.index_select(1, idx).t().contiguous() in one pass instead of two).
   Tokens go 16 at a time: each output row gets a whole 64-byte line per tile, and the 16 input rows are
   read in idx's order (ascending from the caller), so both sides stream. A copy: the values bitwise. */
void id3_gather_columns(const float *a, int64_t a_stride, int64_t tokens, const int64_t *idx, int64_t n,
                        float *out) {
    enum { TILE = 16 };
    int64_t t0 = 0;
#ifdef __AVX512F__
    if ((int64_t)TILE * a_stride < INT32_MAX) {
        int32_t step[TILE];
        for (int t = 0; t < TILE; t++) step[t] = (int32_t)(t * a_stride);
        __m512i offsets = _mm512_loadu_si512(step);
        for (; t0 + TILE <= tokens; t0 += TILE) {
            const float *base = a + t0 * a_stride;
            for (int64_t p = 0; p < n; p++)
                _mm512_storeu_ps(out + p * tokens + t0, _mm512_i32gather_ps(offsets, base + idx[p], 4));
        }
    }
#endif
    for (; t0 < tokens; t0 += TILE) {
        int64_t t1 = t0 + TILE < tokens ? t0 + TILE : tokens;
        for (int64_t p = 0; p < n; p++) {
            const float *col = a + idx[p];
            float *row = out + p * tokens;
            for (int64_t t = t0; t < t1; t++) row[t] = col[t * a_stride];
        }
    }
}

/* out[g, j] = Σ_{t in group g} a[t, j]², groups contiguous (token t in group t·groups / tokens, as
   bounded._group_matrix): one pass over a (T x n, row stride a_stride), no squared copy. out is groups x n,
   zeroed here. */
void id3_group_square_sums(const float *a, int64_t a_stride, int64_t tokens, int64_t n, int64_t groups,
                           float *out) {
    memset(out, 0, (size_t)(groups * n) * sizeof(float));
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = a + t * a_stride;
        float *sums = out + (t * groups / tokens) * n;
        for (int64_t j = 0; j < n; j++) sums[j] += row[j] * row[j];
    }
}

/* (aᵀb)[rows[p], cols[p]] for n pairs in any order (bounded.sampled_products), token by token: a (T x R) and b
   (T x C) are read row by row, as stored, so nothing is transposed or copied; pairs go in chunks whose sums
   and indices stay in cache while the rows stream by (16 pairs per step by gathers where the CPU has them).
   Each pair keeps `dot`'s 32 running sums (token t into sum t mod 32, the last partial block's missing tokens
   as +0) and adds them up in `dot`'s order: the values are `id3_gathered_dots`' bitwise, whichever the
   caller picks. */
void id3_pair_dots(const float *a, int64_t a_stride, const float *b, int64_t b_stride, int64_t tokens,
                   const int32_t *rows, const int32_t *cols, int64_t n, float *out) {
    enum { CHUNK = 256, LANES = 32 };
    float sums[LANES * CHUNK]; /* 32 KiB: a chunk's running sums, kept in L1/L2 while the rows stream by */
    int64_t whole = tokens / LANES * LANES;
    for (int64_t p0 = 0; p0 < n; p0 += CHUNK) {
        int64_t len = n - p0 < CHUNK ? n - p0 : CHUNK;
        const int32_t *restrict r = rows + p0, *restrict c = cols + p0;
        memset(sums, 0, sizeof(float) * LANES * CHUNK);
        for (int64_t t = 0; t < tokens + (tokens == whole ? 0 : LANES - (tokens - whole)); t++) {
            float *restrict acc = sums + (t % LANES) * CHUNK;
            if (t >= tokens) { /* `dot`'s tail adds +0 to the sums no token reached */
                for (int64_t p = 0; p < len; p++) acc[p] += 0.0f;
                continue;
            }
            const float *restrict ar = a + t * a_stride, *restrict br = b + t * b_stride;
            int64_t p = 0;
#ifdef __AVX512F__ /* a multiply, then an add: the scalar loop's roundings */
            for (; p + 16 <= len; p += 16) {
                __m512 x = _mm512_i32gather_ps(_mm512_loadu_si512(r + p), ar, 4);
                __m512 y = _mm512_i32gather_ps(_mm512_loadu_si512(c + p), br, 4);
                _mm512_storeu_ps(acc + p, _mm512_add_ps(_mm512_loadu_ps(acc + p), _mm512_mul_ps(x, y)));
            }
#endif
            for (; p < len; p++) acc[p] += ar[r[p]] * br[c[p]];
        }
        for (int64_t p = 0; p < len; p++) {
            float lane[8];
            for (int j = 0; j < 8; j++) {
                const float *s = sums + j * CHUNK + p;
                lane[j] = (s[0] + s[8 * CHUNK]) + (s[16 * CHUNK] + s[24 * CHUNK]);
            }
            out[p0 + p] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        }
    }
}

/* torch.unique(x, return_inverse=True) for n indices in [0, size): the distinct values ascending into `values`
   and each index's position among them into `inverse`; returns their number. O(n + size) with `slot` (size
   entries) as scratch, against a sort for torch.unique (~45 ns an index here, 2K-index calls). */
int64_t id3_index_set(const int64_t *x, int64_t n, int64_t size, int64_t *slot, int64_t *values, int64_t *inverse) {
    memset(slot, 0, (size_t)size * sizeof(int64_t));
    for (int64_t p = 0; p < n; p++) slot[x[p]] = 1;
    int64_t count = 0;
    for (int64_t v = 0; v < size; v++)
        if (slot[v]) {
            slot[v] = count;
            values[count++] = v;
        }
    for (int64_t p = 0; p < n; p++) inverse[p] = slot[x[p]];
    return count;
}
