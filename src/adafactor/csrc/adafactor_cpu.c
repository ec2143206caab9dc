/* Fused CPU passes of one Adafactor tensor step (see adafactor/_reference.py for the math).
 *
 * Compiled once at first use by adafactor._fused_cpu with the system C compiler
 * (-O3 -march=native -fopenmp -ffp-contract=off) and called through ctypes with raw data pointers,
 * so no torch headers are needed and the build takes about a second.
 *
 * Layout: a factored tensor is viewed as [A, R, B, C, D] (R = row dim, C = col dim). A "segment"
 * is one contiguous run of L = C*D elements with fixed (a, r, b); its row statistics live at
 * row[s*D + d] and its column statistics at col[(a*B + b)*L + j]. An unfactored tensor is cut into
 * segments of SEG elements. Every whole-tensor sum is a sum of per-segment partials (double)
 * added in segment order, so results do not depend on the thread count.
 *
 * Elements are loaded as float32 (bf16 by a 16-bit shift), all math is float32 as in the
 * reference, sums accumulate in float64, bf16 stores round to nearest even (or stochastically with
 * caller-provided noise, the same draws as the reference's torch.randint).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef long long i64;

#define EXPORT __attribute__((visibility("default")))
#define AI static inline __attribute__((always_inline))
#define SEG 4096


enum { MODE_FACT_ADD = 0, MODE_FACT_CLAMP = 1, MODE_FULL_ADD = 2, MODE_FULL_CLAMP = 3 };
/* momentum kind: what the first moment averages, and its storage dtype */
enum { MOM_NONE = 0, MOM_GRAD = 1, MOM_NORM = 2, MOM_UPD = 3 };
/* pass 1's sum of x^2: none; fused into the loop over g; or by sumsq, in pass 3's order (carry) */
enum { X_NONE = 0, X_FUSED = 1, X_SUMSQ = 2 };

typedef struct {
    const void *g;    /* gradient, dtype dt */
    void *x;          /* parameter, dtype dt */
    void *m;          /* exp_avg (mdt) or NULL */
    float *v;         /* full second moment (unfactored) or NULL */
    const int32_t *noise; /* stochastic-rounding noise (numel int32 in [0, 2^16)) or NULL */
    double *row;      /* pass 1 out: row sums of g^2, [A*R*B*D] */
    double *col;      /* pass 1 out: col sums of g^2, [A*B*L] */
    float *rstate;    /* row_var [A*R*B*D] */
    float *cstate;    /* col_var [A*B*L] */
    float *fr;        /* per row: 1/sqrt(R/mean R) (add) or R (clamp), [A*R*B*D] */
    float *fc;        /* per col: 1/sqrt(C) (add) or C (clamp), [A*B*L] */
    float *rm;        /* per row: max(mean R, eps1) (clamp only), [A*R*B*D] */
    double *rsum;     /* per (a, b, d): sum of R over the row dim (all ranks' rows once reduced) */
    i64 numel, R, B, C, D;
    i64 rows_total;   /* size of the row dim in the unsharded tensor (mean R = rsum / rows_total) */
    i64 par_min;       /* fewer elements than this: one thread (see _fused_cpu.parallel_min_numel) */
    float sign, clipv; /* g <- clamp(sign * g, -clipv, clipv) */
    float scale;       /* grad_scale (clipnorm / global_clipnorm), applied in passes 2-3 */
    float eps1, eps_sq; /* eps1 (add) / eps1^2 floor (clamp) */
    float w2, w1;      /* 1 - beta2_t, 1 - beta1 */
    float row_k, col_k; /* scale^2 / n_cols, scale^2 / n_rows (factor means) */
    float inv_clip;    /* 1 / max(1, RMS(U)/d) */
    float alpha;       /* step size alpha_t */
    float f1, f2;      /* weight decay: x <- x*f1 - x*f2 */
    int mode, dt, mdt, mom, want_x, carry_x, nt;
    double out[3];     /* sum g^2, sum x^2 (pass 1); sum u^2 (pass 2); sum x_new^2 (pass 3) */
} Args;

AI float bf2f(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
AI uint16_t f2bf(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t b;
    memcpy(&b, &f, 4);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    return (b & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((b >> 16) | 0x40u) : (uint16_t)r;
}
AI float ldf(const void *p, i64 i, int bf) {
    return bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
AI void stf(void *p, i64 i, int bf, float v) {
    if (bf)
        ((uint16_t *)p)[i] = f2bf(v);
    else
        ((float *)p)[i] = v;
}
/* v rounded to the nearest bf16 (even on ties), kept in float32: no 16-bit narrowing per call */
AI float rnd(float v, int bf) {
    if (!bf) return v;
    uint32_t b;
    memcpy(&b, &v, 4);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) & 0xffff0000u;
    r = (b & 0x7fffffffu) > 0x7f800000u ? (b & 0xffff0000u) | 0x00400000u : r;
    float out;
    memcpy(&out, &r, 4);
    return out;
}
/* store a value already rounded by rnd: for bf16 the low half is zero, truncation is exact */
AI void st_rounded(void *p, i64 i, int bf, float v) {
    if (bf) {
        uint32_t b;
        memcpy(&b, &v, 4);
        ((uint16_t *)p)[i] = (uint16_t)(b >> 16);
    } else {
        ((float *)p)[i] = v;
    }
}
/* torch's vectorised lerp: fmadd(w, b - a, a) for |w| < 0.5, else fmadd(w - 1, b - a, b) */
AI float lerp(float a, float b, float w) {
    int small = fabsf(w) < 0.5f;
    return fmaf(small ? w : w - 1.0f, b - a, small ? a : b);
}
AI float gprep(float g, float sign, float clipv) {
    g *= sign;
    return g < -clipv ? -clipv : (g > clipv ? clipv : g); /* NaN passes through, as torch.clamp */
}

/* Sum of squares of one run; noinline so pass 1 and pass 3 add in exactly the same order.
 * One omp simd reduction per run: an array of float64 lanes looked faster on one long run but
 * doubled the time on the 768-element rows of an embedding (the lanes' setup and final sum). */
#define SUMSQ_BODY(LOAD)                                                                       \
    double acc = 0.0;                                                                          \
    _Pragma("omp simd reduction(+ : acc)") for (i64 j = 0; j < n; j++) {                      \
        double v = (double)(LOAD(j));                                                          \
        acc += v * v;                                                                          \
    }                                                                                          \
    return acc;

#define LOAD_F32(i) p[i]
#define LOAD_BF16(i) bf2f(p[i])
__attribute__((noinline)) static double sumsq_f32(const float *restrict p, i64 n) {
    SUMSQ_BODY(LOAD_F32)
}
__attribute__((noinline)) static double sumsq_bf16(const uint16_t *restrict p, i64 n) {
    SUMSQ_BODY(LOAD_BF16)
}
static double sumsq(const void *p, i64 off, i64 n, int bf) {
    return bf ? sumsq_bf16((const uint16_t *)p + off, n) : sumsq_f32((const float *)p + off, n);
}

static void nsegs(const Args *a, int factored, i64 *nseg, i64 *L) {
    if (factored) {
        *L = a->C * a->D;
        *nseg = *L ? a->numel / *L : 0;
    } else {
        *L = SEG;
        *nseg = (a->numel + SEG - 1) / SEG;
    }
}

static int threads_for(const Args *a) { return a->numel >= a->par_min && a->nt > 1 ? a->nt : 1; }

/* ------------------------------------------------------------------------------------------- */
/* pass 1: sums of g^2 per row / col and over the tensor, and of x^2                            */
/* ------------------------------------------------------------------------------------------- */
AI void stats_seg(Args *a, const int bf, const int factored, const int d1, i64 s, i64 L,
                  double *mycol, double *segg, double *segx) {
    const i64 D = d1 ? 1 : a->D, numel = a->numel;
    const i64 off = s * L, len = factored ? L : (numel - off < L ? numel - off : L);
    const float sign = a->sign, clipv = a->clipv;
    const void *restrict g = a->g;
    double acc = 0.0;
    if (factored && !d1) { /* generic D: scatter into D row accumulators */
        double *rp = a->row + s * D;
        double *restrict cp = mycol + ((s / (a->R * a->B)) * a->B + s % a->B) * L;
        for (i64 d = 0; d < D; d++) rp[d] = 0.0;
        for (i64 j = 0; j < L; j++) {
            float gv = gprep(ldf(g, off + j, bf), sign, clipv);
            double q = (double)(gv * gv);
            cp[j] += q;
            rp[j % D] += q;
        }
        for (i64 d = 0; d < D; d++) acc += rp[d];
    } else if (factored) {
        double *restrict cp = mycol + ((s / (a->R * a->B)) * a->B + s % a->B) * L;
#pragma omp simd reduction(+ : acc)
        for (i64 j = 0; j < L; j++) {
            float gv = gprep(ldf(g, off + j, bf), sign, clipv);
            double q = (double)(gv * gv);
            cp[j] += q;
            acc += q;
        }
        a->row[s] = acc;
    } else {
#pragma omp simd reduction(+ : acc)
        for (i64 j = 0; j < len; j++) {
            float gv = gprep(ldf(g, off + j, bf), sign, clipv);
            acc += (double)(gv * gv);
        }
    }
    segg[s] = acc;
    if (a->want_x) segx[s] = sumsq(a->x, off, len, bf);
}

/* The OpenMP region must not sit inside the always_inline bodies: outlining would turn their
 * compile-time constants into loads from the shared-data block and kill vectorisation. Each thread
 * instead calls a dispatcher whose switch passes literal constants to the inlined body. */
/* A plain matrix (A = B = 1, D = 1): column sums go to a float32 buffer flushed into the float64
 * partials every FLUSH rows. A float64 add per element made pass 1 compute-bound (~3.5x slower
 * than a read of g and x); the flush keeps the float32 part of each sum to FLUSH terms. */
#define FLUSH 16
AI void stats_matrix(Args *a, const int bf, i64 lo, i64 hi, i64 L, double *restrict mycol,
                     double *segg, double *segx) {
    float *restrict fbuf = (float *)calloc((size_t)L, sizeof(float));
    const void *restrict g = a->g;
    const void *restrict x = a->x;
    const float sign = a->sign, clipv = a->clipv;
    for (i64 s = lo; s < hi; s++) {
        const i64 off = s * L;
        /* float32 within a row (as the reference's own sums), float64 across rows */
        float acc = 0.0f, accx = 0.0f;
        if (a->want_x == X_FUSED) { /* one loop over g and x: two streams in step, read once */
#pragma omp simd reduction(+ : acc, accx)
            for (i64 j = 0; j < L; j++) {
                float gv = gprep(ldf(g, off + j, bf), sign, clipv);
                float q = gv * gv;
                fbuf[j] += q;
                acc += q;
                float xv = ldf(x, off + j, bf);
                accx += xv * xv;
            }
            segx[s] = (double)accx;
        } else {
#pragma omp simd reduction(+ : acc)
            for (i64 j = 0; j < L; j++) {
                float gv = gprep(ldf(g, off + j, bf), sign, clipv);
                float q = gv * gv;
                fbuf[j] += q;
                acc += q;
            }
            if (a->want_x == X_SUMSQ) segx[s] = sumsq(x, off, L, bf);
        }
        a->row[s] = acc;
        segg[s] = acc;
        if ((s - lo) % FLUSH == FLUSH - 1 || s == hi - 1) {
#pragma omp simd
            for (i64 j = 0; j < L; j++) {
                mycol[j] += (double)fbuf[j];
                fbuf[j] = 0.0f;
            }
        }
    }
    free(fbuf);
}

AI void stats_range(Args *a, const int bf, const int factored, const int d1, i64 lo, i64 hi,
                    i64 L, double *mycol, double *segg, double *segx) {
    if (factored && d1 && a->numel == a->R * L) {
        stats_matrix(a, bf, lo, hi, L, mycol, segg, segx);
        return;
    }
    for (i64 s = lo; s < hi; s++) stats_seg(a, bf, factored, d1, s, L, mycol, segg, segx);
}

__attribute__((noinline)) static void stats_dispatch(Args *a, int factored, i64 lo, i64 hi,
                                                     i64 L, double *mycol, double *segg,
                                                     double *segx) {
    const int key = (a->dt ? 4 : 0) + (factored ? 2 : 0) + (a->D == 1);
    switch (key) {
    case 0: case 1: stats_range(a, 0, 0, 1, lo, hi, L, mycol, segg, segx); break;
    case 2: stats_range(a, 0, 1, 0, lo, hi, L, mycol, segg, segx); break;
    case 3: stats_range(a, 0, 1, 1, lo, hi, L, mycol, segg, segx); break;
    case 4: case 5: stats_range(a, 1, 0, 1, lo, hi, L, mycol, segg, segx); break;
    case 6: stats_range(a, 1, 1, 0, lo, hi, L, mycol, segg, segx); break;
    default: stats_range(a, 1, 1, 1, lo, hi, L, mycol, segg, segx); break;
    }
}

EXPORT void af_stats(Args *a) {
    const int factored = a->mode == MODE_FACT_ADD || a->mode == MODE_FACT_CLAMP;
    i64 nseg, L;
    nsegs(a, factored, &nseg, &L);
    const int nt = threads_for(a);
    const i64 ncol = factored ? a->numel / a->R : 0;
    double *segg = (double *)malloc(sizeof(double) * (size_t)(2 * nseg + 1));
    double *segx = segg + nseg;
    double *colp = NULL;
    if (factored) {
        memset(a->col, 0, sizeof(double) * (size_t)ncol);
        colp = nt > 1 ? (double *)calloc((size_t)(nt * ncol), sizeof(double)) : a->col;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        double *mycol = factored && nt > 1 ? colp + t * ncol : colp;
        stats_dispatch(a, factored, nseg * t / n, nseg * (t + 1) / n, L, mycol, segg, segx);
    }
    if (factored && nt > 1) {
        for (int t = 0; t < nt; t++) {
            const double *p = colp + t * ncol;
            for (i64 k = 0; k < ncol; k++) a->col[k] += p[k];
        }
        free(colp);
    }
    double gs = 0.0, xs = 0.0;
    for (i64 k = 0; k < nseg; k++) gs += segg[k];
    if (a->want_x)
        for (i64 k = 0; k < nseg; k++) xs += segx[k];
    a->out[0] = gs;
    a->out[1] = xs;
    free(segg);
}

/* ------------------------------------------------------------------------------------------- */
/* between passes 1 and 2 (factored): moving averages R, C and the per-row / per-col factors     */
/* ------------------------------------------------------------------------------------------- */
/* Moving averages R and C, and the sum of R over the row dim for each (a, b, d) into rsum: a
 * sharded caller all-reduces rsum over the row dim's shards before af_factor_scales. */
EXPORT void af_update_factors(Args *a) {
    const i64 L = a->C * a->D, A = a->numel / (a->R * a->B * L), R = a->R, B = a->B, D = a->D;
    const i64 nrow = A * R * B * D, ncol = A * B * L;
    const float add = a->mode == MODE_FACT_CLAMP ? 0.0f : a->eps1, w = a->w2;
    for (i64 i = 0; i < nrow; i++)
        a->rstate[i] = lerp(a->rstate[i], (float)a->row[i] * a->row_k + add, w);
    for (i64 i = 0; i < ncol; i++)
        a->cstate[i] = lerp(a->cstate[i], (float)a->col[i] * a->col_k + add, w);
    for (i64 ia = 0; ia < A; ia++)
        for (i64 ib = 0; ib < B; ib++)
            for (i64 d = 0; d < D; d++) {
                double sum = 0.0;
                for (i64 r = 0; r < R; r++) sum += a->rstate[((ia * R + r) * B + ib) * D + d];
                a->rsum[(ia * B + ib) * D + d] = sum;
            }
}

/* Per-row and per-column factors of pass 2 and 3 from R, C and mean R = rsum / rows_total. */
EXPORT void af_factor_scales(Args *a) {
    const i64 L = a->C * a->D, A = a->numel / (a->R * a->B * L), R = a->R, B = a->B, D = a->D;
    const i64 ncol = A * B * L;
    const int clamp = a->mode == MODE_FACT_CLAMP;
    for (i64 ia = 0; ia < A; ia++)
        for (i64 ib = 0; ib < B; ib++)
            for (i64 d = 0; d < D; d++) {
                const float mean = (float)(a->rsum[(ia * B + ib) * D + d] / (double)a->rows_total);
                for (i64 r = 0; r < R; r++) {
                    const i64 i = ((ia * R + r) * B + ib) * D + d;
                    if (clamp) {
                        a->fr[i] = a->rstate[i];
                        a->rm[i] = mean > a->eps1 ? mean : a->eps1;
                    } else {
                        a->fr[i] = 1.0f / sqrtf(a->rstate[i] / mean);
                    }
                }
            }
    for (i64 i = 0; i < ncol; i++) a->fc[i] = clamp ? a->cstate[i] : 1.0f / sqrtf(a->cstate[i]);
}

/* ------------------------------------------------------------------------------------------- */
/* passes 2 and 3: one element-wise body; PASS 2 updates V (and the grad momentum) and sums     */
/* U^2, PASS 3 recomputes U from the updated state and writes momentum and the parameter        */
/* ------------------------------------------------------------------------------------------- */
#ifdef __AVX512BF16__
#include <immintrin.h>
/* Pass 3 of a plain matrix row with float32 parameters and bf16 'update' momentum, by hand with
 * the AVX-512 BF16 conversion (vcvtneps2bf16: round to nearest even, NaN kept quiet, as f2bf;
 * but a result below 2^-126 flushes to zero where f2bf keeps the subnormal). The generic body's
 * two bit-trick roundings per element made this case compute-bound (2.8x the time of the
 * momentum-free pass 3 on a cache-resident tensor). Returns the elements done (a multiple of 16). */
AI __m512 bf16_round(__m512 v) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static i64 apply_row_mom_bf16(const Args *a, i64 off, i64 len, float frow,
                              const float *restrict fc) {
    const float *restrict g = (const float *)a->g;
    float *restrict x = (float *)a->x;
    uint16_t *restrict m = (uint16_t *)a->m;
    const __m512 sign = _mm512_set1_ps(a->sign), hi = _mm512_set1_ps(a->clipv);
    const __m512 lo = _mm512_set1_ps(-a->clipv), scale = _mm512_set1_ps(a->scale);
    const __m512 fr = _mm512_set1_ps(frow), inv_clip = _mm512_set1_ps(a->inv_clip);
    const __m512 alpha = _mm512_set1_ps(a->alpha), f1 = _mm512_set1_ps(a->f1);
    const __m512 f2 = _mm512_set1_ps(a->f2);
    const int small = fabsf(a->w1) < 0.5f; /* lerp's two forms, as the scalar lerp */
    const __m512 w = _mm512_set1_ps(small ? a->w1 : a->w1 - 1.0f);
    i64 j = 0;
    for (; j + 16 <= len; j += 16) {
        const i64 i = off + j;
        /* max(lo, g) and min(hi, .) return g when g is NaN (the second operand), as gprep */
        __m512 gs = _mm512_mul_ps(_mm512_loadu_ps(g + i), sign);
        gs = _mm512_mul_ps(_mm512_min_ps(hi, _mm512_max_ps(lo, gs)), scale);
        __m512 upd = _mm512_mul_ps(_mm512_mul_ps(gs, fr), _mm512_loadu_ps(fc + j));
        upd = bf16_round(_mm512_mul_ps(_mm512_mul_ps(upd, inv_clip), alpha));
        __m512 mv = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(m + i))), 16));
        __m512 diff = _mm512_sub_ps(upd, mv);
        upd = bf16_round(_mm512_fmadd_ps(w, diff, small ? mv : upd));
        _mm256_storeu_si256((__m256i *)(m + i), (__m256i)_mm512_cvtneps_pbh(upd));
        __m512 xv = _mm512_loadu_ps(x + i);
        __m512 xn = _mm512_sub_ps(_mm512_sub_ps(_mm512_mul_ps(xv, f1), _mm512_mul_ps(xv, f2)), upd);
        _mm512_storeu_ps(x + i, xn);
    }
    return j;
}
#endif

AI void elem_seg(Args *a, const int PASS, const int MODE, const int bf, const int MOM, const int mbf,
                 const int d1, const int SR, i64 s, i64 L, double *segu, double *segx) {
    const int factored = MODE == MODE_FACT_ADD || MODE == MODE_FACT_CLAMP;
    const i64 D = d1 ? 1 : a->D, numel = a->numel;
    const i64 off = s * L, len = factored ? L : (numel - off < L ? numel - off : L);
    const float sign = a->sign, clipv = a->clipv, scale = a->scale, eps1 = a->eps1;
    const float eps_sq = a->eps_sq, w2 = a->w2, w1 = a->w1, inv_clip = a->inv_clip;
    const float alpha = a->alpha, f1 = a->f1, f2 = a->f2;
    /* every pointer in a restrict local: stores through m, v, x must not alias *a */
    const float *restrict fr = a->fr ? a->fr + s * D : NULL;
    const float *restrict rm = a->rm ? a->rm + s * D : NULL;
    const float *restrict fc =
        factored ? a->fc + ((s / (a->R * a->B)) * a->B + s % a->B) * L : NULL;
    float *restrict v = a->v;
    void *restrict m = a->m;
    void *restrict x = a->x;
    const void *restrict g = a->g;
    const int32_t *restrict noise = a->noise;
    float acc = 0.0f; /* sum of u^2 of one segment; float64 across segments */
    i64 j0 = 0;
#ifdef __AVX512BF16__
    if (PASS == 3 && MODE == MODE_FACT_ADD && d1 && !bf && MOM == MOM_UPD && mbf && !SR)
        j0 = apply_row_mom_bf16(a, off, len, fr[0], fc);
#endif
#pragma omp simd reduction(+ : acc)
    for (i64 j = j0; j < len; j++) {
        const i64 i = off + j;
        const float gs = gprep(ldf(g, i, bf), sign, clipv) * scale;
        float num = gs;
        if (MOM == MOM_GRAD) {
            if (PASS == 2) {
                num = rnd(lerp(ldf(m, i, mbf), rnd(gs, mbf), w1), mbf);
                st_rounded(m, i, mbf, num);
            } else {
                num = ldf(m, i, mbf);
            }
        }
        float u;
        if (MODE == MODE_FACT_ADD) {
            u = num * fr[j % D] * fc[j];
        } else if (MODE == MODE_FACT_CLAMP) {
            float vh = fr[j % D] * fc[j] / rm[j % D];
            u = num / sqrtf(vh > eps_sq ? vh : eps_sq);
        } else {
            float vv;
            if (PASS == 2) {
                vv = lerp(v[i], MODE == MODE_FULL_ADD ? gs * gs + eps1 : gs * gs, w2);
                v[i] = vv;
            } else {
                vv = v[i];
            }
            if (MODE == MODE_FULL_CLAMP) vv = vv > eps_sq ? vv : eps_sq;
            u = num / sqrtf(vv);
        }
        if (PASS == 2) {
            acc += u * u;
        } else {
            float upd = u * inv_clip;
            if (MOM == MOM_NORM) {
                upd = rnd(lerp(ldf(m, i, mbf), rnd(upd, mbf), w1), mbf);
                st_rounded(m, i, mbf, upd);
            }
            upd = upd * alpha;
            if (MOM == MOM_UPD) {
                upd = rnd(lerp(ldf(m, i, mbf), rnd(upd, mbf), w1), mbf);
                st_rounded(m, i, mbf, upd);
            }
            const float xv = ldf(x, i, bf);
            float xn = (xv * f1 - xv * f2) - upd;
            if (SR) { /* stochastic rounding: add 16 random low bits, truncate */
                uint32_t b;
                memcpy(&b, &xn, 4);
                ((uint16_t *)x)[i] = (uint16_t)((b + (uint32_t)noise[i]) >> 16);
            } else {
                stf(x, i, bf, xn);
            }
        }
    }
    if (PASS == 2) segu[s] = (double)acc;
    else if (a->carry_x) segx[s] = sumsq(x, off, len, bf);
}

AI void elem_range(Args *a, const int PASS, const int MODE, const int bf, const int MOM,
                   const int mbf, const int d1, const int SR, i64 lo, i64 hi, i64 L, double *seg) {
    for (i64 s = lo; s < hi; s++) elem_seg(a, PASS, MODE, bf, MOM, mbf, d1, SR, s, L, seg, seg);
}

/* dispatch on the compile-time constants: mode x d1 x momentum kind x bf16 momentum x SR */
#define ELEM_MOM(PASS, MODE, BF, D1, SR)                                                       \
    do {                                                                                       \
        switch (a->mom * 2 + a->mdt) {                                                         \
        case MOM_GRAD * 2: elem_range(a, PASS, MODE, BF, MOM_GRAD, 0, D1, SR, RARGS); break;     \
        case MOM_GRAD * 2 + 1: elem_range(a, PASS, MODE, BF, MOM_GRAD, 1, D1, SR, RARGS); break; \
        case MOM_NORM * 2: elem_range(a, PASS, MODE, BF, MOM_NORM, 0, D1, SR, RARGS); break;     \
        case MOM_NORM * 2 + 1: elem_range(a, PASS, MODE, BF, MOM_NORM, 1, D1, SR, RARGS); break; \
        case MOM_UPD * 2: elem_range(a, PASS, MODE, BF, MOM_UPD, 0, D1, SR, RARGS); break;       \
        case MOM_UPD * 2 + 1: elem_range(a, PASS, MODE, BF, MOM_UPD, 1, D1, SR, RARGS); break;   \
        default: elem_range(a, PASS, MODE, BF, MOM_NONE, 0, D1, SR, RARGS); break;               \
        }                                                                                      \
    } while (0)

/* pass 2 only reads the momentum in 'grad' mode: fold the other kinds into MOM_NONE */
#define ELEM2(MODE, BF, D1, SR)                                                                \
    do {                                                                                       \
        if (a->mom == MOM_GRAD && a->mdt)                                                      \
            elem_range(a, 2, MODE, BF, MOM_GRAD, 1, D1, 0, RARGS);                             \
        else if (a->mom == MOM_GRAD)                                                           \
            elem_range(a, 2, MODE, BF, MOM_GRAD, 0, D1, 0, RARGS);                             \
        else                                                                                   \
            elem_range(a, 2, MODE, BF, MOM_NONE, 0, D1, 0, RARGS);                             \
    } while (0)

#define ELEM3(MODE, BF, D1, SR) ELEM_MOM(3, MODE, BF, D1, SR)

/* Specialised (vectorised) bodies for the common modes only; the rest (eps1 clamp, factored
 * dims followed by more dims) share one generic body with run-time flags. Specialising every
 * mode tripled the build time (~12 s) for layouts real models rarely use. */
#define ELEM_MODES(M, BF, SR)                                                                  \
    do {                                                                                       \
        if (a->mode == MODE_FACT_ADD) M(MODE_FACT_ADD, BF, 1, SR);                             \
        else M(MODE_FULL_ADD, BF, 1, SR);                                                      \
    } while (0)

__attribute__((noinline)) static void elem_generic(Args *a, int pass, i64 lo, i64 hi, i64 L,
                                                   double *seg) {
    elem_range(a, pass, a->mode, a->dt, a->mom, a->mdt, 0, pass == 3 && a->dt && a->noise, lo,
               hi, L, seg);
}

#define RARGS lo, hi, L, seg
__attribute__((noinline)) static void elem_dispatch(Args *a, int pass, i64 lo, i64 hi, i64 L,
                                                    double *seg) {
    if (!((a->mode == MODE_FACT_ADD && a->D == 1) || a->mode == MODE_FULL_ADD)) {
        elem_generic(a, pass, lo, hi, L, seg);
    } else if (pass == 2) {
        if (a->dt) ELEM_MODES(ELEM2, 1, 0);
        else ELEM_MODES(ELEM2, 0, 0);
    } else {
        if (a->dt && a->noise) ELEM_MODES(ELEM3, 1, 1);
        else if (a->dt) ELEM_MODES(ELEM3, 1, 0);
        else ELEM_MODES(ELEM3, 0, 0);
    }
}
#undef RARGS

static void elem_run(Args *a, int pass) {
    const int factored = a->mode == MODE_FACT_ADD || a->mode == MODE_FACT_CLAMP;
    i64 nseg, L;
    nsegs(a, factored, &nseg, &L);
    const int nt = threads_for(a);
    double *seg = (double *)malloc(sizeof(double) * (size_t)(nseg + 1));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        elem_dispatch(a, pass, nseg * t / n, nseg * (t + 1) / n, L, seg);
    }
    double sum = 0.0;
    if (pass == 2 || a->carry_x)
        for (i64 s = 0; s < nseg; s++) sum += seg[s];
    a->out[pass == 2 ? 2 : 1] = sum;
    free(seg);
}

EXPORT void af_update_sq(Args *a) { elem_run(a, 2); }

EXPORT void af_apply(Args *a) { elem_run(a, 3); }

EXPORT int af_abi_version(void) { return 2; }
