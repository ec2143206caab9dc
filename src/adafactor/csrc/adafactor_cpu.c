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


/* The options' values come from the Python enums of adafactor/_plan.py, passed as -D definitions
 * by adafactor/_fused_cpu.py (one definition per mode, shared with the Triton kernels). */
#ifndef AF_MOM_UPDATE
#error "build this file through adafactor._fused_cpu, which defines the AF_* option values"
#endif
/* momentum kind: what the first moment averages (Momentum) */
enum { MOM_NONE = AF_MOM_NONE, MOM_GRAD = AF_MOM_GRAD, MOM_NORM = AF_MOM_NORMALIZED_UPDATE,
       MOM_UPD = AF_MOM_UPDATE };
/* weight decay (WeightDecay): x(1 - lr wd); x - x(lr wd) with RMS(x) scaled by |1 - lr wd|;
 * x - x(alpha wd); x - x wd */
enum { WD_LR = AF_WD_LR, WD_LR_BEFORE = AF_WD_LR_BEFORE, WD_ALPHA = AF_WD_ALPHA,
       WD_UNSCALED = AF_WD_UNSCALED };
/* the kernel's own layout code: factored or not x where eps1 enters (Eps1Mode) */
enum { MODE_FACT_ADD = 0, MODE_FACT_CLAMP = 1, MODE_FULL_ADD = 2, MODE_FULL_CLAMP = 3 };
/* pass 1's sum of x^2: none; fused into the loop over g; or by sumsq, in pass 3's order (carry) */
enum { X_NONE = 0, X_FUSED = 1, X_SUMSQ = 2 };

typedef struct {
    const void *g;    /* gradient, dtype dt */
    void *x;          /* parameter, dtype dt */
    void *m;          /* exp_avg (mdt) or NULL */
    float *v;         /* full second moment (unfactored) or NULL */
    const int32_t *noise; /* stochastic-rounding noise (numel int32 in [0, 2^16)) or NULL */
    uint16_t *comp;   /* kahan_summation: the bf16 compensation of a bf16 x (numel), or NULL */
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
    int mode, dt, mdt, mom, want_x, carry_x, verify_x, nt;
    double out[4];     /* sum g^2, sum x^2 (pass 1); sum u^2 (pass 2); sum x_new^2, x_old^2 (pass 3) */
    /* the step's scalars (af_finish, af_apply): the group's options and what they give */
    i64 numel_total, cols_total; /* element count and col dim size of the unsharded tensor */
    double lr, rho, eps2, wd, clipnorm, clip_d; /* clipnorm, clip_d: 0 when not set */
    double gscale;     /* global_clipnorm factor (1 when not set) */
    double carried;    /* with use_carried: the previous step's sum of x^2, which af_stats reports */
    int scale_param, wd_mode, use_carried;
    double alpha_out, update_rms; /* alpha_t and RMS(U) of the step, as the reference's floats */
    double *segbuf;    /* 2 * segments + 1 doubles for the passes' partial sums, or NULL (malloc) */
    int err;           /* ERR_*: nothing was written to x or the state */
} Args;

/* Args.err: an allocation failed; a finite gradient overflowed float32 in pass 1 (af_step) */
enum { ERR_ALLOC = 1, ERR_OVERFLOW = 2 };

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
/* Saturation (the reference's _saturate, _lerp_finite_): finite gradients give finite parameters
 * and state without update clipping. A value beyond a dtype's largest finite one becomes that one
 * (NaN stays NaN); every result that rounds to a finite value keeps its bits. */
#define F32_MAX 3.40282347e+38f
#define BF16_MAX 3.38953139e+38f /* 0x7f7f0000: larger float32 values round to bf16 inf */
AI float sat(float v, float mx) { return v < -mx ? -mx : (v > mx ? mx : v); }
/* m <- lerp(m, b, w) of a momentum of dtype bf (rounded): b saturated to the dtype; where
 * b - m overflows float32, the weighted sum m (1 - w) + b w (finite; lerp gives inf or NaN) */
AI float mom_lerp(float m, float b, float w, int bf) {
    const float mx = bf ? BF16_MAX : F32_MAX;
    b = rnd(sat(b, mx), bf);
    const float r = lerp(m, b, w), ws = m * (1.0f - w) + b * w;
    return rnd(sat(fabsf(r) <= F32_MAX ? r : ws, mx), bf);
}
AI float gprep(float g, float sign, float clipv) {
    g *= sign;
    return g < -clipv ? -clipv : (g > clipv ? clipv : g); /* NaN passes through, as torch.clamp */
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define AF_AVX512 1
#include <immintrin.h>
/* Rows of a plain matrix by hand for passes 1 and 2. GCC keeps one vector accumulator per
 * `omp simd` reduction, so a row's sum was a single chain of dependent adds (about 6 cycles per
 * 16 elements, slower than the memory); four accumulators (16-element chunk k goes to k % 4) make
 * these passes memory-bound. Same float32 formulas as the scalar bodies, another summation order. */
AI __m512 ld16(const void *p, i64 i, int bf, __mmask16 k) {
    if (k == 0xffff) { /* full chunks: plain loads (the masked forms are slower on some cores) */
        if (bf)
            return _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
        return _mm512_loadu_ps((const float *)p + i);
    }
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(k, (const float *)p + i);
}
/* max(lo, g) and min(hi, .) return g when g is NaN (the second operand), as gprep */
AI __m512 gprep16(__m512 g, __m512 sign, __m512 lo, __m512 hi) {
    return _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(g, sign)));
}
/* sat over 16 lanes (NaN kept: max/min return the second operand when one is NaN) */
AI __m512 sat16(__m512 v, __m512 mx) {
    return _mm512_min_ps(mx, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), mx), v));
}
AI __mmask16 finite16(__m512 v) { /* |v| <= FLT_MAX: false for inf and NaN */
    return _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(F32_MAX), _CMP_LE_OQ);
}
AI __mmask16 tail_mask(i64 left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }
AI float hsum4(__m512 s0, __m512 s1, __m512 s2, __m512 s3) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
/* The chunk order every row sum shares: chunk k of each 64-element block adds into accumulator k
 * (CHUNK pastes k onto its accumulators' names), the tail's masked chunks into accumulator 0.
 * One loop for all rows, because the carried sum of x^2 (sumsq16, pass 3) must add in exactly
 * the order of pass 1 (stats_row16) to equal it bit for bit. */
#define ROW_CHUNKS(L, CHUNK)                                                                   \
    do {                                                                                       \
        i64 j = 0;                                                                             \
        for (; j + 64 <= (L); j += 64) {                                                       \
            CHUNK(j, 0xffff, 0);                                                               \
            CHUNK(j + 16, 0xffff, 1);                                                          \
            CHUNK(j + 32, 0xffff, 2);                                                          \
            CHUNK(j + 48, 0xffff, 3);                                                          \
        }                                                                                      \
        for (; j < (L); j += 16) CHUNK(j, tail_mask((L) - j), 0);                              \
    } while (0)

/* One 16-element chunk of pass 1 (mask m) into the accumulators s (g^2) and t (x^2). */
#define STATS16(J, M, K)                                                                    \
    do {                                                                                       \
        const __m512 gv = gprep16(ld16(a->g, off + (J), bf, M), sign, lo, hi);                 \
        const __m512 q = _mm512_mul_ps(gv, gv);                                                \
        if (M == 0xffff)                                                                       \
            _mm512_storeu_ps(fbuf + (J), _mm512_add_ps(_mm512_loadu_ps(fbuf + (J)), q));       \
        else                                                                                   \
            _mm512_mask_storeu_ps(fbuf + (J), M, _mm512_add_ps(_mm512_maskz_loadu_ps(M, fbuf + (J)), q)); \
        s##K = _mm512_add_ps(s##K, q);                                                         \
        if (want_x) {                                                                          \
            const __m512 xv = ld16(a->x, off + (J), bf, M);                                    \
            t##K = _mm512_add_ps(t##K, _mm512_mul_ps(xv, xv));                                 \
        }                                                                                      \
    } while (0)

/* pass 1 over one row: fbuf[j] += g^2; returns the row's sum of g^2 and, with want_x, of x^2 */
AI float stats_row16(const Args *a, const int bf, const int want_x, i64 off, i64 L,
                     float *restrict fbuf, float *xsum) {
    const __m512 sign = _mm512_set1_ps(a->sign), hi = _mm512_set1_ps(a->clipv);
    const __m512 lo = _mm512_set1_ps(-a->clipv);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    ROW_CHUNKS(L, STATS16);
    *xsum = hsum4(t0, t1, t2, t3);
    return hsum4(s0, s1, s2, s3);
}

#define USQ16(J, M, K)                                                                         \
    do {                                                                                       \
        const __m512 gs = _mm512_mul_ps(gprep16(ld16(a->g, off + (J), bf, M), sign, lo, hi), scale); \
        const __m512 u = _mm512_mul_ps(_mm512_mul_ps(gs, fr), M == 0xffff ? _mm512_loadu_ps(fc + (J)) : _mm512_maskz_loadu_ps(M, fc + (J))); \
        s##K = _mm512_add_ps(s##K, _mm512_mul_ps(u, u));                                       \
    } while (0)

/* pass 2 over one row of a factored tensor: the sum of u^2, u = (g' fr) fc */
AI float usq_row16(const Args *a, const int bf, i64 off, i64 L, float frow,
                   const float *restrict fc) {
    const __m512 sign = _mm512_set1_ps(a->sign), hi = _mm512_set1_ps(a->clipv);
    const __m512 lo = _mm512_set1_ps(-a->clipv), scale = _mm512_set1_ps(a->scale);
    const __m512 fr = _mm512_set1_ps(frow);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    ROW_CHUNKS(L, USQ16);
    return hsum4(s0, s1, s2, s3);
}
#endif

/* A run's sum of x^2 in float64 squares, where its float32 sum overflowed (|x| near 2^64 or
 * beyond: the true RMS(x), as the reference's float64 squares). Such a sum is never carried to
 * the next step (see _keep_carry), so pass 3 need not match it. */
__attribute__((noinline)) static double sumsq_wide(const void *p, i64 off, i64 n, int bf) {
    double acc = 0.0;
    for (i64 j = 0; j < n; j++) {
        const double v = (double)ldf(p, off + j, bf);
        acc += v * v;
    }
    return acc;
}
AI double sq_or_wide(float sum, const void *p, i64 off, i64 n, int bf) {
    return isinf(sum) ? sumsq_wide(p, off, n, bf) : (double)sum;
}

#ifdef AF_AVX512
/* Sum of x^2 over one run in ROW_CHUNKS order with stats_row16's adds,
 * so the sum pass 3 carries to the next step equals the one pass 1 would compute, bit for bit. */
#define SQ16(J, M, K)                                                                          \
    do {                                                                                       \
        const __m512 xv = ld16(p, off + (J), bf, M);                                           \
        t##K = _mm512_add_ps(t##K, _mm512_mul_ps(xv, xv));                                     \
    } while (0)
AI double sumsq16(const void *p, i64 off, i64 n, const int bf) {
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    ROW_CHUNKS(n, SQ16);
    return sq_or_wide(hsum4(t0, t1, t2, t3), p, off, n, bf);
}
__attribute__((noinline)) static double sumsq_f32(const void *p, i64 off, i64 n) {
    return sumsq16(p, off, n, 0);
}
__attribute__((noinline)) static double sumsq_bf16(const void *p, i64 off, i64 n) {
    return sumsq16(p, off, n, 1);
}
static double sumsq(const void *p, i64 off, i64 n, int bf) {
    return bf ? sumsq_bf16(p, off, n) : sumsq_f32(p, off, n);
}
#else
/* Sum of squares of one run; noinline so pass 1 and pass 3 add in exactly the same order. */
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
#endif

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
    if (!fbuf) {
        a->err = 1; /* the caller writes nothing: pass 1 only fills its own buffers */
        return;
    }
    const void *restrict g = a->g;
    const void *restrict x = a->x;
    const float sign = a->sign, clipv = a->clipv;
    for (i64 s = lo; s < hi; s++) {
        const i64 off = s * L;
        /* float32 within a row (SIMD adds; it overflows where the reference's float64 row sum
         * exceeds float32, so both take the float64 path), float64 across rows */
        float acc = 0.0f, accx = 0.0f;
#ifdef AF_AVX512
        if (1) {
            /* the x^2 sums of X_FUSED and X_SUMSQ are the same adds here (see sumsq16) */
            acc = stats_row16(a, bf, a->want_x != X_NONE, off, L, fbuf, &accx);
            if (a->want_x) segx[s] = sq_or_wide(accx, x, off, L, bf);
        } else
#endif
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
            segx[s] = sq_or_wide(accx, x, off, L, bf);
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
    double *segg = a->segbuf ? a->segbuf : (double *)malloc(sizeof(double) * (size_t)(2 * nseg + 1));
    double *colp = NULL;
    if (factored) colp = nt > 1 ? (double *)calloc((size_t)(nt * ncol), sizeof(double)) : a->col;
    if (!segg || (factored && !colp)) {
        if (segg != a->segbuf) free(segg);
        if (colp != a->col) free(colp);
        a->err = 1;
        return;
    }
    double *segx = segg + nseg;
    if (factored) memset(a->col, 0, sizeof(double) * (size_t)ncol);
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
            double *mycol = factored ? colp + t * ncol : colp;
            stats_dispatch(a, factored, nseg * t / n, nseg * (t + 1) / n, L, mycol, segg, segx);
        }
    } else { /* no parallel region: entering one costs about a microsecond even for one thread */
        stats_dispatch(a, factored, 0, nseg, L, colp, segg, segx);
    }
    if (a->err) {
        if (colp != a->col) free(colp);
        if (segg != a->segbuf) free(segg);
        return;
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
    a->out[1] = a->use_carried ? a->carried : xs; /* the carried sum stands in for x's */
    if (segg != a->segbuf) free(segg);
}

/* ------------------------------------------------------------------------------------------- */
/* between passes 1 and 2 (factored): moving averages R, C and the per-row / per-col factors     */
/* ------------------------------------------------------------------------------------------- */
/* Python's max(a, b) (b if b > a else a): a NaN first argument wins, as in the reference */
static double pymax(double a, double b) { return b > a ? b : a; }

/* Moving averages R and C, and the sum of R over the row dim for each (a, b, d) into rsum: a
 * sharded caller all-reduces rsum over the row dim's shards before af_factor_scales. */
static void update_factors(Args *a) {
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

/* Between pass 1 and the factors: the gradient's clip scale and alpha_t from out[0] (sum g^2) and
 * out[1] (sum x^2), both already summed over the ranks by a sharded caller; then R and C. */
EXPORT void af_finish(Args *a) {
    double scale = a->gscale;
    if (a->clipnorm > 0) scale = a->clipnorm / pymax(sqrt(a->out[0]), a->clipnorm);
    double alpha = a->rho;
    if (a->scale_param) {
        double rms = sqrt(a->out[1] / (double)(a->numel_total > 1 ? a->numel_total : 1));
        if (a->wd_mode == WD_LR_BEFORE && a->wd != 0) rms *= fabs(1 - a->lr * a->wd);
        /* saturated, as the reference: inf once x^2 overflows float32 (inf * rho: NaN at lr 0) */
        if (rms > F32_MAX) rms = F32_MAX;
        alpha = pymax(rms, a->eps2) * a->rho;
    }
    a->scale = (float)scale;
    a->alpha = (float)alpha;
    a->alpha_out = alpha;
    const int factored = a->mode == MODE_FACT_ADD || a->mode == MODE_FACT_CLAMP;
    if (factored) {
        a->row_k = (float)(scale * scale / (double)a->cols_total);
        a->col_k = (float)(scale * scale / (double)a->rows_total);
        update_factors(a);
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
                        /* sqrt(mean) / sqrt(R): R / mean would underflow to 0 beside a huge row */
                        a->fr[i] = sqrtf(mean) / sqrtf(a->rstate[i]);
                    }
                }
            }
    for (i64 i = 0; i < ncol; i++) a->fc[i] = clamp ? a->cstate[i] : 1.0f / sqrtf(a->cstate[i]);
}

/* ------------------------------------------------------------------------------------------- */
/* passes 2 and 3: one element-wise body; PASS 2 updates V (and the grad momentum) and sums     */
/* U^2, PASS 3 recomputes U from the updated state and writes momentum and the parameter        */
/* ------------------------------------------------------------------------------------------- */
#ifdef AF_AVX512
/* 16 floats rounded to bf16 as f2bf / rnd (nearest even, NaN kept and made quiet): the bf16 bits
 * to store, and their value as float32 for the math that follows. */
typedef struct {
    __m512 f;
    __m256i h;
} bf16x16;
AI bf16x16 bf16_from_bits32(__m512i r) { /* r: the bf16 in the low half of each 32-bit lane */
    bf16x16 out = {_mm512_castsi512_ps(_mm512_slli_epi32(r, 16)), _mm512_cvtepi32_epi16(r)};
    return out;
}
AI bf16x16 bf16_round_int(__m512 v) { /* integer ops: exact for subnormals too */
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
    return bf16_from_bits32(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet));
}
AI bf16x16 bf16_round(__m512 v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    /* vcvtneps2bf16 rounds the same way in one instruction, but flushes subnormal inputs to zero:
     * those (rare) vectors take the integer ops (fpclass 0x20: subnormal) */
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) == 0, 1)) {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        bf16x16 out = {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), h};
        return out;
    }
#endif
    return bf16_round_int(v);
}
AI void st16(void *p, i64 i, int bf, __mmask16 k, __m512 v, __m256i h) { /* h: bf16 bits of v */
    if (bf) {
        if (k == 0xffff) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), h);
        else _mm256_mask_storeu_epi16((uint16_t *)p + i, k, h);
    } else if (k == 0xffff) {
        _mm512_storeu_ps((float *)p + i, v);
    } else {
        _mm512_mask_storeu_ps((float *)p + i, k, v);
    }
}

/* Pass 3 over one row of a plain factored matrix without stochastic rounding, with no momentum or
 * 'update' momentum: the scalar body's formulas, 16 lanes at a time, and the sums of x^2 before
 * (verify_x) and after (carry_x) the write in ROW_CHUNKS order, so they equal sumsq16's. */
#define APPLY16(J, M, K)                                                                        \
    do {                                                                                        \
        const i64 i = off + (J);                                                                \
        const __m512 gs = _mm512_mul_ps(gprep16(ld16(a->g, i, bf, M), sign, lo, hi), scale);    \
        const __m512 fcv = M == 0xffff ? _mm512_loadu_ps(fc + (J)) : _mm512_maskz_loadu_ps(M, fc + (J)); \
        const __m512 u = _mm512_mul_ps(_mm512_mul_ps(gs, fr), fcv);                             \
        const __m512 xv = ld16(a->x, i, bf, M);                                                 \
        const __m512 xd = _mm512_sub_ps(_mm512_mul_ps(xv, f1), _mm512_mul_ps(xv, f2));          \
        __m512 upd = _mm512_mul_ps(_mm512_mul_ps(u, inv_clip), alpha);                          \
        __m512 mv = _mm512_setzero_ps();                                                        \
        __m256i mh = _mm256_setzero_si256();                                                    \
        if (MOM == MOM_UPD) { /* m <- lerp(m, upd, w1), both rounded to the momentum dtype */   \
            mv = ld16(a->m, i, mbf, M);                                                         \
            const __m512 ub = mbf ? bf16_round(upd).f : upd;                                    \
            upd = _mm512_fmadd_ps(w, _mm512_sub_ps(ub, mv), small ? mv : ub);                   \
            if (mbf) {                                                                          \
                const bf16x16 r = bf16_round(upd);                                              \
                upd = r.f;                                                                      \
                mh = r.h;                                                                       \
            }                                                                                   \
        }                                                                                       \
        __m512 xn = _mm512_sub_ps(xd, upd);                                                     \
        /* The saturations of the scalar body change nothing unless something overflowed, and   \
         * then x is not finite in its dtype: only such (rare) chunks are recomputed with them. */ \
        if (__builtin_expect(_mm512_cmp_ps_mask(_mm512_abs_ps(xn), xmax, _CMP_LE_OQ) != 0xffff, 0)) { \
            upd = sat16(_mm512_mul_ps(_mm512_mul_ps(sat16(u, fmax32), inv_clip), alpha), fmax32); \
            if (MOM == MOM_UPD) { /* mom_lerp */                                                \
                const __m512 b = mbf ? bf16_round(sat16(upd, mmax)).f : upd;                    \
                const __m512 rb = _mm512_fmadd_ps(w, _mm512_sub_ps(b, mv), small ? mv : b);     \
                const __m512 ws = _mm512_add_ps(_mm512_mul_ps(mv, keep1), _mm512_mul_ps(b, w1v)); \
                upd = sat16(_mm512_mask_blend_ps(finite16(rb), ws, rb), mmax);                  \
                if (mbf) {                                                                      \
                    const bf16x16 r = bf16_round(upd);                                          \
                    upd = r.f;                                                                  \
                    mh = r.h;                                                                   \
                }                                                                               \
            }                                                                                   \
            xn = sat16(_mm512_sub_ps(xd, upd), xmax);                                           \
        }                                                                                       \
        if (MOM == MOM_UPD) st16(a->m, i, mbf, M, upd, mh);                                     \
        if (verify) o##K = _mm512_add_ps(o##K, _mm512_mul_ps(xv, xv));                          \
        __m256i xh = _mm256_setzero_si256();                                                    \
        if (bf) {                                                                               \
            const bf16x16 r = bf16_round(xn);                                                   \
            xn = r.f;                                                                           \
            xh = r.h;                                                                           \
        }                                                                                       \
        st16(a->x, i, bf, M, xn, xh);                                                           \
        if (carry) {                                                                            \
            const __m512 z = _mm512_maskz_mov_ps(M, xn); /* lanes past the row add +0 */        \
            n##K = _mm512_add_ps(n##K, _mm512_mul_ps(z, z));                                    \
        }                                                                                       \
    } while (0)

AI void apply_row16(const Args *a, const int bf, const int MOM, const int mbf, const int verify,
                    const int carry, i64 off, i64 L, float frow, const float *restrict fc,
                    double *old_sq, double *new_sq) {
    const __m512 sign = _mm512_set1_ps(a->sign), hi = _mm512_set1_ps(a->clipv);
    const __m512 lo = _mm512_set1_ps(-a->clipv), scale = _mm512_set1_ps(a->scale);
    const __m512 fr = _mm512_set1_ps(frow), inv_clip = _mm512_set1_ps(a->inv_clip);
    const __m512 alpha = _mm512_set1_ps(a->alpha), f1 = _mm512_set1_ps(a->f1);
    const __m512 f2 = _mm512_set1_ps(a->f2);
    const int small = fabsf(a->w1) < 0.5f; /* lerp's two forms, as the scalar lerp */
    const __m512 w = _mm512_set1_ps(small ? a->w1 : a->w1 - 1.0f);
    const __m512 w1v = _mm512_set1_ps(a->w1), keep1 = _mm512_set1_ps(1.0f - a->w1);
    const __m512 fmax32 = _mm512_set1_ps(F32_MAX), mmax = _mm512_set1_ps(mbf ? BF16_MAX : F32_MAX);
    const __m512 xmax = _mm512_set1_ps(bf ? BF16_MAX : F32_MAX);
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, n0 = o0, n1 = o0, n2 = o0, n3 = o0;
    ROW_CHUNKS(L, APPLY16);
    if (verify) *old_sq = (double)hsum4(o0, o1, o2, o3);
    if (carry) *new_sq = (double)hsum4(n0, n1, n2, n3);
}

/* the row kernel's cases as compile-time constants (verify and carry stay run-time flags) */
AI void apply_row(const Args *a, const int bf, const int MOM, const int mbf, i64 off, i64 L,
                  float frow, const float *restrict fc, double *old_sq, double *new_sq) {
    if (a->verify_x) apply_row16(a, bf, MOM, mbf, 1, 1, off, L, frow, fc, old_sq, new_sq);
    else if (a->carry_x) apply_row16(a, bf, MOM, mbf, 0, 1, off, L, frow, fc, old_sq, new_sq);
    else apply_row16(a, bf, MOM, mbf, 0, 0, off, L, frow, fc, old_sq, new_sq);
}
#endif

/* U of element j of a segment from its numerator: by the per-row and per-column factors
 * (factored) or by V (unfactored; pass 2 passes the V it just stored) */
AI float u_of(const int MODE, float num, const float *fr, const float *rm, const float *fc, i64 j,
              i64 D, float vv, float eps_sq) {
    if (MODE == MODE_FACT_ADD) return num * fr[j % D] * fc[j];
    if (MODE == MODE_FACT_CLAMP) {
        const float vh = fr[j % D] * fc[j] / rm[j % D];
        return num / sqrtf(vh > eps_sq ? vh : eps_sq);
    }
    if (MODE == MODE_FULL_CLAMP) vv = vv > eps_sq ? vv : eps_sq;
    return num / sqrtf(vv);
}

/* A segment whose float32 sum of u^2 overflowed: the float64 squares summed in float64 (the
 * true RMS(U), as the reference's), with u recomputed from what pass 2 stored (V, and a
 * gradient momentum already rounded to its dtype: the numerator pass 2 used). Rare: only
 * after an outlier without update clipping, so one plain loop. */
static double usq_wide(const Args *a, int MODE, int bf, int MOM, int mbf, i64 off, i64 len,
                       i64 D, const float *fr, const float *rm, const float *fc) {
    const int factored = MODE == MODE_FACT_ADD || MODE == MODE_FACT_CLAMP;
    double acc = 0.0;
    for (i64 j = 0; j < len; j++) {
        const i64 i = off + j;
        const float gs = gprep(ldf(a->g, i, bf), a->sign, a->clipv) * a->scale;
        const float num = MOM == MOM_GRAD ? ldf(a->m, i, mbf) : gs;
        const double u = u_of(MODE, num, fr, rm, fc, j, D, factored ? 0.0f : a->v[i], a->eps_sq);
        acc += u * u;
    }
    return acc;
}

AI void elem_seg(Args *a, const int PASS, const int MODE, const int bf, const int MOM, const int mbf,
                 const int d1, const int SR, i64 s, i64 L, double *seg, double *segv) {
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
    uint16_t *restrict comp = a->comp;
    float acc = 0.0f; /* sum of u^2 of one segment; float64 across segments */
    i64 j0 = 0;
#ifdef AF_AVX512
    if (PASS == 3 && MODE == MODE_FACT_ADD && d1 && !SR && (MOM == MOM_NONE || MOM == MOM_UPD)) {
        apply_row(a, bf, MOM, mbf, off, len, fr[0], fc, &segv[s], &seg[s]);
        return;
    }
    if (PASS == 2 && MODE == MODE_FACT_ADD && d1 && MOM != MOM_GRAD) {
        acc = usq_row16(a, bf, off, len, fr[0], fc);
        j0 = len;
    }
#endif
    /* the x^2 sum the carried one must equal (same code, same order), before x is overwritten */
    if (PASS == 3 && a->verify_x) segv[s] = sumsq(x, off, len, bf);
#pragma omp simd reduction(+ : acc)
    for (i64 j = j0; j < len; j++) {
        const i64 i = off + j;
        const float gs = gprep(ldf(g, i, bf), sign, clipv) * scale;
        float num = gs;
        if (MOM == MOM_GRAD) {
            if (PASS == 2) {
                num = mom_lerp(ldf(m, i, mbf), gs, w1, mbf);
                st_rounded(m, i, mbf, num);
            } else {
                num = ldf(m, i, mbf);
            }
        }
        float vv = 0.0f;
        if (!factored) {
            if (PASS == 2) {
                vv = lerp(v[i], MODE == MODE_FULL_ADD ? gs * gs + eps1 : gs * gs, w2);
                v[i] = vv;
            } else {
                vv = v[i];
            }
        }
        const float u = u_of(MODE, num, fr, rm, fc, j, D, vv, eps_sq);
        if (PASS == 2) {
            acc += u * u;
        } else {
            float upd = sat(u, F32_MAX) * inv_clip; /* U beyond float32 (no update clipping) */
            if (MOM == MOM_NORM) {
                upd = mom_lerp(ldf(m, i, mbf), upd, w1, mbf);
                st_rounded(m, i, mbf, upd);
            }
            upd = sat(upd * alpha, F32_MAX);
            if (MOM == MOM_UPD) {
                upd = mom_lerp(ldf(m, i, mbf), upd, w1, mbf);
                st_rounded(m, i, mbf, upd);
            }
            const float xv = ldf(x, i, bf);
            float xn = (xv * f1 - xv * f2) - upd; /* +-inf at most: upd is finite */
            if (SR == 1) { /* stochastic rounding: add 16 random low bits, truncate */
                uint32_t b;
                xn = sat(xn, BF16_MAX);
                memcpy(&b, &xn, 4);
                ((uint16_t *)x)[i] = (uint16_t)((b + (uint32_t)noise[i]) >> 16);
            } else if (SR == 2) { /* Kahan: t = x + c; x = bf16(t); c = bf16(t - x) */
                const float t = sat(xn + bf2f(comp[i]), BF16_MAX);
                const float r = rnd(t, 1);
                comp[i] = f2bf(t - r);
                st_rounded(x, i, 1, r);
            } else {
                stf(x, i, bf, sat(xn, bf ? BF16_MAX : F32_MAX));
            }
        }
    }
    if (PASS == 2)
        seg[s] = isinf(acc) ? usq_wide(a, MODE, bf, MOM, mbf, off, len, D, fr, rm, fc) : (double)acc;
    else if (a->carry_x) seg[s] = sumsq(x, off, len, bf);
}

AI void elem_range(Args *a, const int PASS, const int MODE, const int bf, const int MOM,
                   const int mbf, const int d1, const int SR, i64 lo, i64 hi, i64 L, double *seg,
                   double *segv) {
    for (i64 s = lo; s < hi; s++) elem_seg(a, PASS, MODE, bf, MOM, mbf, d1, SR, s, L, seg, segv);
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
                                                   double *seg, double *segv) {
    /* SR: 1 stochastic rounding, 2 Kahan summation (pass 3 of a bf16 x), else 0 */
    const int sr = pass == 3 && a->dt ? (a->comp ? 2 : a->noise ? 1 : 0) : 0;
    elem_range(a, pass, a->mode, a->dt, a->mom, a->mdt, 0, sr, lo, hi, L, seg, segv);
}

#define RARGS lo, hi, L, seg, segv
__attribute__((noinline)) static void elem_dispatch(Args *a, int pass, i64 lo, i64 hi, i64 L,
                                                    double *seg, double *segv) {
    /* Kahan's write (rare: pure-bf16 training) takes the generic body, not the row kernels */
    if (!((a->mode == MODE_FACT_ADD && a->D == 1) || a->mode == MODE_FULL_ADD) ||
        (pass == 3 && a->dt && a->comp)) {
        elem_generic(a, pass, lo, hi, L, seg, segv);
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
    /* per segment: sum u^2 (pass 2) or x_new^2 (pass 3), then x_old^2 (pass 3, verify_x) */
    double *seg = a->segbuf ? a->segbuf : (double *)malloc(sizeof(double) * (size_t)(2 * nseg + 1));
    if (!seg) {
        a->err = 1;
        return;
    }
    double *segv = seg + nseg;
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
            elem_dispatch(a, pass, nseg * t / n, nseg * (t + 1) / n, L, seg, segv);
        }
    } else {
        elem_dispatch(a, pass, 0, nseg, L, seg, segv);
    }
    double sum = 0.0, old = 0.0;
    if (pass == 2 || a->carry_x)
        for (i64 s = 0; s < nseg; s++) sum += seg[s];
    if (pass == 3 && a->verify_x)
        for (i64 s = 0; s < nseg; s++) old += segv[s];
    a->out[pass == 2 ? 2 : 1] = sum;
    if (pass == 3) a->out[3] = old;
    if (seg != a->segbuf) free(seg);
}

EXPORT void af_update_sq(Args *a) { elem_run(a, 2); }

/* Pass 3 after the clip factor from out[2] (sum u^2, summed over the ranks by a sharded caller) and
 * the weight decay factors. */
EXPORT void af_apply(Args *a) {
    const double rms = sqrt(a->out[2] / (double)(a->numel_total > 1 ? a->numel_total : 1));
    a->update_rms = rms;
    double inv_clip = 1.0;
    if (a->clip_d > 0) inv_clip = isnan(rms) ? NAN : 1.0 / pymax(1.0, rms / a->clip_d);
    a->inv_clip = (float)inv_clip;
    double f1 = 1.0, f2 = 0.0;
    if (a->wd != 0) {
        if (a->wd_mode == WD_LR) f1 = 1 - a->lr * a->wd;
        else if (a->wd_mode == WD_LR_BEFORE) f2 = a->lr * a->wd;
        else if (a->wd_mode == WD_ALPHA) /* alpha_t saturated, as below */
            f2 = (a->alpha_out > F32_MAX ? F32_MAX : a->alpha_out) * a->wd;
        else if (a->lr != 0) f2 = a->wd; /* an lr of 0 changes nothing, in every form */
    }
    a->f1 = (float)f1;
    a->f2 = sat((float)f2, F32_MAX);
    /* alpha_t = RMS(x) rho_t is inf for weights near float32's largest value with rho_t > 1:
     * inf * 0 is NaN */
    a->alpha = sat(a->alpha, F32_MAX);
    elem_run(a, 3);
}

/* A finite gradient whose squares overflow float32 (|g| > 1.8e19, or sums beyond 3.4e38): pass 1
 * wrote only its own buffers, so the caller can step this tensor in float64 instead (the
 * reference's wide path) and nothing here is half done. A non-finite gradient is not an overflow:
 * it propagates as in every reference. */
static int beyond_f32(double v) { return !(fabs(v) <= 3.4028234663852886e38); } /* NaN too */

static int overflowed(const Args *a) {
    int bad = !isfinite(a->out[0]);
    const int factored = a->mode == MODE_FACT_ADD || a->mode == MODE_FACT_CLAMP;
    if (!bad && factored) { /* the row and col sums become float32 in the moving averages */
        const i64 ncol = a->numel / a->R, nrow = a->numel / a->C;
        for (i64 k = 0; k < ncol && !bad; k++) bad = beyond_f32(a->col[k]);
        for (i64 k = 0; k < nrow && !bad; k++) bad = beyond_f32(a->row[k]);
    }
    if (!bad) return 0;
    const int bf = a->dt;
    for (i64 i = 0; i < a->numel; i++)
        if (!isfinite(ldf(a->g, i, bf))) return 0;
    return 1;
}

/* All of one unsharded tensor's step: pass 1, the scalars, R and C, pass 2, pass 3. The partial
 * sums' buffer is allocated first, so a failed allocation leaves x and the state untouched. */
EXPORT void af_step(Args *a) {
    const int factored = a->mode == MODE_FACT_ADD || a->mode == MODE_FACT_CLAMP;
    i64 nseg, L;
    nsegs(a, factored, &nseg, &L);
    /* small tensors (a few segments) take the partial sums' buffer from the stack: no malloc */
    double local[64];
    const size_t need = (size_t)(2 * nseg + 1);
    double *own = NULL;
    if (!a->segbuf) {
        own = need <= sizeof local / sizeof local[0] ? local : (double *)malloc(sizeof(double) * need);
        a->segbuf = own;
    }
    if (!a->segbuf) {
        a->err = 1;
        return;
    }
    af_stats(a);
    if (!a->err && overflowed(a)) a->err = ERR_OVERFLOW;
    if (!a->err) {
        af_finish(a);
        if (factored) af_factor_scales(a);
        elem_run(a, 2);
        af_apply(a);
    }
    if (own) {
        if (own != local) free(own);
        a->segbuf = NULL;
    }
}

/* ------------------------------------------------------------------------------------------- */
/* one call per param group                                                                     */
/* ------------------------------------------------------------------------------------------- */
/* Per tensor, TABLE_I int64 (pointers, layout, flags) and TABLE_D float64 (this step's scalars in,
 * its statistics out); per group, the options in GROUP_D / GROUP_I. Layouts: _fused_cpu.py. */
enum { TI_G, TI_X, TI_M, TI_V, TI_NOISE, TI_RSTATE, TI_CSTATE, TI_STEP, TI_COMP, TI_NUMEL, TI_R,
       TI_B, TI_C, TI_D, TI_ROWS, TI_COLS, TI_FLAGS, TABLE_I };
enum { TD_LR, TD_RHO, TD_W2, TD_EPS1, TD_CARRIED, TD_ALPHA, TD_RMS, TD_NEW_SQ, TD_OLD_SQ,
       TD_STATUS, TABLE_D };
enum { GD_SIGN, GD_CLIPV, GD_W1, GD_EPS2, GD_WD, GD_CLIPNORM, GD_CLIP_D, GD_GSCALE, GROUP_D };
enum { GI_WD_MODE, GI_MOM, GI_SCALE_PARAM, GI_CLAMP, GI_NT, GI_PAR_MIN, GROUP_I };
/* TI_FLAGS bits */
enum { F_BF16 = 1, F_MBF16 = 2, F_FACTORED = 4, F_CARRY = 8, F_USE_CARRIED = 16, F_WANT_X = 32,
       F_VERIFY = 64 };

/* One tensor of a group: its Args from the tables, work buffers, the step. 0, or 1 when an
 * allocation failed (nothing written). */
static int group_tensor(const i64 *ti, double *td, const double *gd, const i64 *gi, int nt) {
    Args a;
    memset(&a, 0, sizeof a);
    const i64 flags = ti[TI_FLAGS];
    const int factored = (flags & F_FACTORED) != 0, clamp = (int)gi[GI_CLAMP];
    a.g = (const void *)ti[TI_G];
    a.x = (void *)ti[TI_X];
    a.m = (void *)ti[TI_M];
    a.v = (float *)ti[TI_V];
    a.noise = (const int32_t *)ti[TI_NOISE];
    a.comp = (flags & F_BF16) ? (uint16_t *)ti[TI_COMP] : NULL;
    a.numel = a.numel_total = ti[TI_NUMEL];
    a.R = ti[TI_R], a.B = ti[TI_B], a.C = ti[TI_C], a.D = ti[TI_D];
    a.rows_total = ti[TI_ROWS], a.cols_total = ti[TI_COLS];
    a.par_min = gi[GI_PAR_MIN];
    a.nt = nt;
    a.dt = (flags & F_BF16) != 0, a.mdt = (flags & F_MBF16) != 0;
    a.mode = factored ? (clamp ? MODE_FACT_CLAMP : MODE_FACT_ADD)
                      : (clamp ? MODE_FULL_CLAMP : MODE_FULL_ADD);
    a.mom = (int)gi[GI_MOM];
    a.wd_mode = (int)gi[GI_WD_MODE], a.scale_param = (int)gi[GI_SCALE_PARAM];
    a.sign = (float)gd[GD_SIGN], a.clipv = (float)gd[GD_CLIPV], a.w1 = (float)gd[GD_W1];
    a.eps2 = gd[GD_EPS2], a.wd = gd[GD_WD], a.clipnorm = gd[GD_CLIPNORM];
    a.clip_d = gd[GD_CLIP_D], a.gscale = gd[GD_GSCALE];
    a.lr = td[TD_LR], a.rho = td[TD_RHO];
    a.w2 = (float)td[TD_W2];
    a.eps1 = (float)td[TD_EPS1], a.eps_sq = (float)(td[TD_EPS1] * td[TD_EPS1]);
    a.carried = td[TD_CARRIED];
    a.use_carried = (flags & F_USE_CARRIED) != 0;
    a.carry_x = (flags & F_CARRY) != 0;
    a.verify_x = a.use_carried || (flags & F_VERIFY) != 0; /* pass 3 sums the old x^2 too */
    a.want_x = !(flags & F_WANT_X) ? X_NONE : (a.carry_x ? X_SUMSQ : X_FUSED);
    void *work = NULL;
    double local[256]; /* small factored tensors: the work buffers from the stack, no malloc */
    if (factored) {
        const i64 nrow = a.numel / a.C, ncol = a.numel / a.R;
        const i64 n64 = nrow + ncol + nrow / a.R, n32 = nrow * (clamp ? 2 : 1) + ncol;
        const size_t bytes = sizeof(double) * (size_t)n64 + sizeof(float) * (size_t)n32;
        work = bytes <= sizeof local ? (void *)local : malloc(bytes);
        if (!work) return 1;
        a.row = (double *)work;
        a.col = a.row + nrow;
        a.rsum = a.col + ncol;
        a.fr = (float *)(a.rsum + nrow / a.R);
        a.fc = a.fr + nrow;
        a.rm = clamp ? a.fc + ncol : NULL;
        a.rstate = (float *)ti[TI_RSTATE];
        a.cstate = (float *)ti[TI_CSTATE];
    }
    af_step(&a);
    if (work != (void *)local) free(work);
    td[TD_STATUS] = a.err;
    if (a.err == ERR_OVERFLOW) return 0; /* untouched; the caller steps it in float64 */
    if (a.err) return 1;
    td[TD_ALPHA] = a.alpha_out;
    td[TD_RMS] = a.update_rms;
    td[TD_NEW_SQ] = a.out[1];
    td[TD_OLD_SQ] = a.out[3];
    return 0;
}

/* Every tensor of a param group in one call. Tensors below the parallel threshold run one per
 * thread (their sums do not depend on which thread), larger ones one at a time on all threads.
 * Returns the number of tensors whose allocation failed (those were left untouched). */
EXPORT int af_group_step(int n, const i64 *ti, double *td, const double *gd, const i64 *gi) {
    const int nt = (int)gi[GI_NT];
    const i64 par_min = gi[GI_PAR_MIN];
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) reduction(+ : failed) if (nt > 1 && n > 1)
    for (int i = 0; i < n; i++)
        if (ti[i * TABLE_I + TI_NUMEL] < par_min)
            failed += group_tensor(ti + i * TABLE_I, td + i * TABLE_D, gd, gi, 1);
    for (int i = 0; i < n; i++)
        if (ti[i * TABLE_I + TI_NUMEL] >= par_min)
            failed += group_tensor(ti + i * TABLE_I, td + i * TABLE_D, gd, gi, nt);
    return failed;
}

/* t <- t + 1 for every tensor's step counter (float64), and the new t of each into t_out: the
 * caller turns them into the step's scalars (adafactor._plan.step_scalars) before the step. */
EXPORT void af_advance_steps(int n, const i64 *ti, double *t_out) {
    for (int i = 0; i < n; i++) {
        double *step = (double *)ti[i * TABLE_I + TI_STEP];
        t_out[i] = *step += 1.0;
    }
}

/* The option values this kernel implements, as bit masks over the enums' values (which: 0 the
 * momentum kinds, 1 the weight-decay forms): the Python side refuses to load a kernel that lacks
 * one of its enum members, instead of running the default branch for it mid-training. */
EXPORT i64 af_supported(int which) {
    if (which == 0) return (1 << MOM_NONE) | (1 << MOM_GRAD) | (1 << MOM_NORM) | (1 << MOM_UPD);
    return (1 << WD_LR) | (1 << WD_LR_BEFORE) | (1 << WD_ALPHA) | (1 << WD_UNSCALED);
}

/* The layout checks of the Python side: sizeof(Args) for the ctypes mirror, the table widths. */
EXPORT i64 af_layout(int what) {
    switch (what) {
    case 0: return (i64)sizeof(Args);
    case 1: return TABLE_I;
    case 2: return TABLE_D;
    case 3: return GROUP_D;
    default: return GROUP_I;
    }
}
