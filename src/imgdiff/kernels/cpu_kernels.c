/* imgdiff's fused CPU kernels: the sampler updates of imgdiff/kernels/reference.py in one pass.
 *
 * Compiled on first use by imgdiff/kernels/cpu.py with the system C compiler (-O3, OpenMP when
 * the compiler has it), as a CPython extension module with cpu_module.c's entry points where
 * Python's headers are installed, else as a shared library called through ctypes. Every
 * function reads each input once and writes each output once, computes in float32 whatever the
 * storage (float32 or bfloat16), and splits its work over up to `threads` OpenMP threads
 * (IMGDIFF_PER_THREAD elements or more each; team_size). Pointers address dense memory of `n`
 * elements in one shared layout (the Python side checks it).
 *
 * On x86-64 Linux each function is built three times (AVX-512, AVX2/FMA and baseline; GCC
 * target_clones) and the loader picks the one the processor runs. AVX-512 matters for bfloat16,
 * whose conversions make the loops compute-bound; float32 is bound by memory either way.
 * Compilers that reject the clones build with IMGDIFF_NO_CLONES (baseline only).
 */
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define IMGDIFF_CLONES_HERE 1 /* a platform and compiler the per-CPU versions are built for */
#else
#define IMGDIFF_CLONES_HERE 0
#endif
#if IMGDIFF_CLONES_HERE && !defined(IMGDIFF_NO_CLONES)
#define IMGDIFF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMGDIFF_CLONES
#endif

/* whether this platform and compiler get per-CPU versions (in a build without IMGDIFF_NO_CLONES) */
int imgdiff_clones_here(void) { return IMGDIFF_CLONES_HERE; }

/* Threads for n elements: at most `threads`, each with IMGDIFF_PER_THREAD elements or more. Below
 * that a team's start and join (~0.43 us for 2 threads) and the traffic between the cores' caches
 * cost more than a thread saves. Measured on 2 Zen 5 cores in whole sampler steps, whose kernels
 * read what the step's previous kernel or torch wrote (benchmarks/kernels.py's steps), rather than
 * in back-to-back calls on the same buffers (which stay split between the cores' caches and
 * flatter a team): EDICT and DDIM steps ran 0.4-1.4 us faster on one thread at 16384 elements and
 * 0.25-2.5 us at 24576, and as fast or faster on two from 32768. Every kernel splits alike (no
 * per-kernel minimum): a step whose two kernels split differently (tried: 8192 for the heavier
 * bfloat16 sub-step) moved data between the cores and was slower. */
#define IMGDIFF_PER_THREAD 16384
static inline int team_size(int64_t n, int threads) {
    const int64_t most = n / IMGDIFF_PER_THREAD;
    return most < threads ? (int)most : threads;
}

/* fn(args, lo, hi) over `items` work items split into `team` slices, one per thread. Team 1
 * calls fn directly: an OpenMP region costs ~260 ns even when it runs serially (`if(0)`; libgomp
 * on 2 Zen 5 cores, ~430 ns for a team of 2), and a call on 4096 float32 elements takes ~0.17 us
 * without it. OpenMP rather than threads of our own: torch's libgomp, loaded first, is the one
 * the kernels then run on, so they share torch's threads. A team of our own (tried: ~50 ns to
 * hand out a slice) competed with torch's threads, which spin for a while after each of torch's
 * own parallel calls: EDICT steps at (8, 4, 64, 64) between diffusers' took 30-40% longer. */
typedef void (*team_fn)(const void *args, int64_t lo, int64_t hi);
static void run_team(team_fn fn, const void *args, int64_t items, int team) {
    if (team > items) team = (int)items;
    if (team <= 1) {
        fn(args, 0, items);
        return;
    }
#if defined(_OPENMP)
#pragma omp parallel num_threads(team)
    {
        const int64_t i = omp_get_thread_num(), got = omp_get_num_threads();
        fn(args, items * i / got, items * (i + 1) / got);
    }
#else
    fn(args, 0, items);
#endif
}

int imgdiff_has_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}

static inline float ld_f32(const void *p, int64_t i) { return ((const float *)p)[i]; }
static inline void st_f32(void *p, int64_t i, float v) { ((float *)p)[i] = v; }

/* bfloat16 is the top half of a float32; stores round to nearest even, NaN stays NaN. */
static inline float ld_bf16(const void *p, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void st_bf16(void *p, int64_t i, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    ((uint16_t *)p)[i] = (uint16_t)(v != v ? 0x7fc0u : r);
}

/* Blocks. The elementwise kernels below walk their elements in blocks of IMGDIFF_BLOCK, the unit
 * the OpenMP threads share. A block's float32 results go straight to a float32 output
 * (stage_f32); for a bfloat16 output they are staged in a float32 buffer on the stack and stored
 * per block (flush_bf16): with the processor's conversion instruction where it has AVX512-BF16
 * (one instruction per 16 values, round to nearest even, as st_bf16; Zen 4 and later, Intel
 * Cooper Lake and Sapphire Rapids and later), which makes those kernels, bound by their
 * conversions, 1.3-1.8x faster; else with st_bf16 in the kernel's own vectorised loop. */
#define IMGDIFF_BLOCK 512

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(IMGDIFF_NO_CLONES)
#include <immintrin.h>
#include <stdlib.h>
#define IMGDIFF_BF16_ISA 1
static int bf16_isa = 0; /* set once when the library loads; IMGDIFF_CPU_BF16_ISA=0 turns it off */
__attribute__((constructor)) static void detect_bf16_isa(void) {
    const char *choice = getenv("IMGDIFF_CPU_BF16_ISA");
    __builtin_cpu_init();
    bf16_isa = __builtin_cpu_supports("avx512bf16") != 0 && !(choice && choice[0] == '0');
}
/* inputs denormal as bfloat16 are read as zero by the instruction; st_bf16 keeps them (both
 * round every other value the same way) */
__attribute__((target("avx512f,avx512bf16"))) static void flush_bf16_isa(uint16_t *restrict o,
                                                                        const float *restrict t,
                                                                        int64_t m) {
    int64_t j = 0;
    for (; j + 16 <= m; j += 16)
        _mm256_storeu_si256((__m256i *)(o + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(t + j)));
    for (; j < m; j++) st_bf16(o, j, t[j]);
}
#endif

/* whether bfloat16 outputs are stored with the AVX512-BF16 instruction */
int imgdiff_bf16_isa(void) {
#if defined(IMGDIFF_BF16_ISA)
    return bf16_isa;
#else
    return 0;
#endif
}

static inline float *stage_f32(void *o, int64_t s, float *buf) {
    (void)buf;
    return (float *)o + s;
}
static inline void flush_f32(void *o, int64_t s, const float *t, int64_t m) {
    (void)o, (void)s, (void)t, (void)m;
}
static inline float *stage_bf16(void *o, int64_t s, float *buf) {
    (void)o, (void)s;
    return buf;
}
static inline void flush_bf16(void *o, int64_t s, const float *restrict t, int64_t m) {
#if defined(IMGDIFF_BF16_ISA)
    if (bf16_isa) {
        flush_bf16_isa((uint16_t *)o + s, t, m);
        return;
    }
#endif
    for (int64_t j = 0; j < m; j++) st_bf16(o, s + j, t[j]);
}

/* the mixing pair's general form at one element: u' = alpha u + beta v, v' = alpha v + beta u' */
static inline void mix_at(float u, float v, float alpha, float beta, float *uo, float *vo) {
    *uo = alpha * u + beta * v;
    *vo = alpha * v + beta * *uo;
}

/* An output may be one of the inputs (the loops' in-place calls: lincomb3's x, the substep's
 * sequence not moved, the blend's noise), so those pointers carry no `restrict`. Each element is
 * read before it is written and no other element is touched: no dependence between iterations,
 * which this pragma tells the vectoriser instead of a run-time overlap check. */
#if defined(__GNUC__) && !defined(__clang__)
#define IMGDIFF_ELEMENTWISE _Pragma("GCC ivdep")
#else
#define IMGDIFF_ELEMENTWISE
#endif

/* Blocks [b0, b1) of the n elements, each starting at s: a kernel's range function walks them
 * (run_team hands each thread a slice of the blocks). */
#define IMGDIFF_BLOCKS(s)                                                                          \
    for (int64_t s = b0 * IMGDIFF_BLOCK; s < n && s < b1 * IMGDIFF_BLOCK; s += IMGDIFF_BLOCK)
static inline int64_t block_len(int64_t n, int64_t s) {
    return n - s < IMGDIFF_BLOCK ? n - s : IMGDIFF_BLOCK;
}
static inline int64_t blocks_of(int64_t n) { return (n + IMGDIFF_BLOCK - 1) / IMGDIFF_BLOCK; }

/* Each kernel is a range function over work items (blocks of elements, or for the blend's
 * broadcast masks runs of a row or of sites), called by run_team with the kernel's arguments in
 * one of these. */
typedef struct {
    const void *x, *y, *z;
    float a, b, c;
    void *out;
    int64_t n;
} lincomb3_args;
typedef struct {
    const void *u, *v;
    float alpha, beta;
    void *uo, *vo;
    int64_t n;
} edict_mix_args;
typedef struct {
    const void *x, *y, *e;
    float a, b, c, p;
    int update_x;
    void *xo, *yo;
    int64_t n;
} substep_mix_args;
typedef struct {
    const void *x, *k, *z, *m;
    float ks, ns;
    int mode;
    int64_t n, channels, plane;
    void *out;
} blend_args;

/* out = a x + b y (+ c z when z is not NULL): DDIM, fixed-variance DDPM, conversions. */
#define IMGDIFF_LINCOMB3(S)                                                                        \
    IMGDIFF_CLONES static void lincomb3_##S(const void *args, int64_t b0, int64_t b1) {            \
        const lincomb3_args *A = args;                                                             \
        const void *x = A->x, *restrict y = A->y, *restrict z = A->z;                              \
        const float a = A->a, b = A->b, c = A->c;                                                  \
        void *out = A->out;                                                                        \
        const int64_t n = A->n;                                                                    \
        IMGDIFF_BLOCKS(s) {                                                                        \
            const int64_t m = block_len(n, s);                                                     \
            float buf[IMGDIFF_BLOCK];                                                              \
            float *t = stage_##S(out, s, buf);                                                     \
            if (z) {                                                                               \
                IMGDIFF_ELEMENTWISE                                                                \
                for (int64_t j = 0; j < m; j++)                                                    \
                    t[j] = a * ld_##S(x, s + j) + b * ld_##S(y, s + j) + c * ld_##S(z, s + j);     \
            } else {                                                                               \
                IMGDIFF_ELEMENTWISE                                                                \
                for (int64_t j = 0; j < m; j++) t[j] = a * ld_##S(x, s + j) + b * ld_##S(y, s + j);\
            }                                                                                      \
            flush_##S(out, s, t, m);                                                               \
        }                                                                                          \
    }                                                                                              \
    void imgdiff_lincomb3_##S(const void *x, float a, const void *y, float b, const void *z,       \
                              float c, void *out, int64_t n, int threads) {                        \
        const lincomb3_args A = {x, y, z, a, b, c, out, n};                                        \
        run_team(lincomb3_##S, &A, blocks_of(n), team_size(n, threads));                           \
    }
IMGDIFF_LINCOMB3(f32)
IMGDIFF_LINCOMB3(bf16)

/* EDICT's mixing pair in its general form: u' = alpha u + beta v, then v' = alpha v + beta u'.
 * alpha = p, beta = 1 - p is the mixing layer (Wallace et al. 2023, eq. 13) on (x, y); called on
 * (y, x) with alpha = 1/p, beta = -(1-p)/p it is its exact inverse, y first (algorithms spec
 * 4.3). */
#define IMGDIFF_EDICT_MIX(S)                                                                       \
    IMGDIFF_CLONES static void edict_mix_##S(const void *args, int64_t b0, int64_t b1) {           \
        const edict_mix_args *A = args;                                                            \
        const void *restrict u = A->u, *restrict v = A->v;                                         \
        const float alpha = A->alpha, beta = A->beta;                                              \
        void *restrict uo = A->uo, *restrict vo = A->vo;                                           \
        const int64_t n = A->n;                                                                    \
        IMGDIFF_BLOCKS(s) {                                                                        \
            const int64_t m = block_len(n, s);                                                     \
            float ubuf[IMGDIFF_BLOCK], vbuf[IMGDIFF_BLOCK];                                        \
            float *restrict ut = stage_##S(uo, s, ubuf), *restrict vt = stage_##S(vo, s, vbuf);    \
            for (int64_t j = 0; j < m; j++)                                                        \
                mix_at(ld_##S(u, s + j), ld_##S(v, s + j), alpha, beta, ut + j, vt + j);           \
            flush_##S(uo, s, ut, m);                                                               \
            flush_##S(vo, s, vt, m);                                                               \
        }                                                                                          \
    }                                                                                              \
    void imgdiff_edict_mix_##S(const void *u, const void *v, float alpha, float beta, void *uo,    \
                               void *vo, int64_t n, int threads) {                                 \
        const edict_mix_args A = {u, v, alpha, beta, uo, vo, n};                                   \
        run_team(edict_mix_##S, &A, blocks_of(n), team_size(n, threads));                          \
    }
IMGDIFF_EDICT_MIX(f32)
IMGDIFF_EDICT_MIX(bf16)

/* EDICT's second affine sub-step and the mixing pair (Wallace et al. 2023, eq. 10-13): the
 * sequence being updated (x when update_x, else y) becomes a z + b e + c w, w the other one (c is
 * 0 for epsilon models; others fold their eps estimate's input term into it), then the mixing
 * pair. The updated value stays in float32 for the mixing. One loop per updated sequence: a
 * single loop selecting per element was 4-6% slower in bfloat16 (GCC 12 did not unswitch it). */
#define IMGDIFF_EDICT_SUBSTEP_MIX(S)                                                               \
    IMGDIFF_CLONES static void edict_substep_mix_##S(const void *args, int64_t b0, int64_t b1) {   \
        const substep_mix_args *A = args;                                                          \
        const void *x = A->x, *y = A->y, *restrict e = A->e;                                       \
        const float a = A->a, b = A->b, c = A->c, p = A->p, q = 1.0f - A->p;                       \
        void *xo = A->xo, *yo = A->yo;                                                             \
        const int64_t n = A->n;                                                                    \
        IMGDIFF_BLOCKS(s) {                                                                        \
            const int64_t m = block_len(n, s);                                                     \
            float xbuf[IMGDIFF_BLOCK], ybuf[IMGDIFF_BLOCK];                                        \
            float *xt = stage_##S(xo, s, xbuf), *yt = stage_##S(yo, s, ybuf);                      \
            if (A->update_x) {                                                                     \
                IMGDIFF_ELEMENTWISE                                                                \
                for (int64_t j = 0; j < m; j++) {                                                  \
                    const float yv = ld_##S(y, s + j);                                             \
                    const float xv = a * ld_##S(x, s + j) + b * ld_##S(e, s + j) + c * yv;         \
                    mix_at(xv, yv, p, q, xt + j, yt + j);                                          \
                }                                                                                  \
            } else {                                                                               \
                IMGDIFF_ELEMENTWISE                                                                \
                for (int64_t j = 0; j < m; j++) {                                                  \
                    const float xv = ld_##S(x, s + j);                                             \
                    const float yv = a * ld_##S(y, s + j) + b * ld_##S(e, s + j) + c * xv;         \
                    mix_at(xv, yv, p, q, xt + j, yt + j);                                          \
                }                                                                                  \
            }                                                                                      \
            flush_##S(xo, s, xt, m);                                                               \
            flush_##S(yo, s, yt, m);                                                               \
        }                                                                                          \
    }                                                                                              \
    void imgdiff_edict_substep_mix_##S(const void *x, const void *y, const void *e, float a,       \
                                       float b, float c, float p, int update_x, void *xo,          \
                                       void *yo, int64_t n, int threads) {                         \
        const substep_mix_args A = {x, y, e, a, b, c, p, update_x, xo, yo, n};                     \
        run_team(edict_substep_mix_##S, &A, blocks_of(n), team_size(n, threads));                  \
    }
IMGDIFF_EDICT_SUBSTEP_MIX(f32)
IMGDIFF_EDICT_SUBSTEP_MIX(bf16)

/* out = (1 - m) x + m (ks k + ns z): Palette's clean paste and RePaint's noised paste.
 * mode 0: the mask has x's shape and layout; 1: (B, 1, S) against contiguous (B, C, S);
 * 2: (B, 1, S) against channels-last (B, S, C) memory. n elements; channels = C (modes 1, 2) and
 * plane = S (mode 1) say how the mask broadcasts, and are not read in mode 0. One
 * function per storage S, mask storage M (float32, or S) and with (z) or without (nz) noise, so
 * the inner loops carry no per-element branches. Each mode walks runs of at most a block of
 * consecutive elements, staged and stored as the kernels above. */
/* LEN elements from I0 into T; the mask read at MI0 + j (MSTEP 1) or at MI0 (MSTEP 0) */
#define IMGDIFF_BLEND_RUN(S, M, HAS_Z, MSTEP, T, I0, LEN, MI0)                                     \
    do {                                                                                           \
        IMGDIFF_ELEMENTWISE                                                                        \
        for (int64_t j = 0; j < (LEN); j++) {                                                      \
            const float mv = ld_##M(m, (MI0) + (MSTEP) * j), xv = ld_##S(x, (I0) + j);             \
            float pv = ks * ld_##S(k, (I0) + j);                                                   \
            if (HAS_Z) pv += ns * ld_##S(z, (I0) + j);                                             \
            (T)[j] = xv * (1.0f - mv) + pv * mv;                                                   \
        }                                                                                          \
    } while (0)

/* the blend's work items: blocks (mode 0), runs of rows (1), runs of sites (2) */
static int64_t blend_items(const blend_args *A) {
    if (A->mode == 0) return blocks_of(A->n);
    if (A->mode == 1) return A->n / A->plane * ((A->plane + IMGDIFF_BLOCK - 1) / IMGDIFF_BLOCK);
    const int64_t sites = A->n / A->channels;
    if (A->channels <= IMGDIFF_BLOCK) {
        const int64_t per = IMGDIFF_BLOCK / A->channels;
        return (sites + per - 1) / per;
    }
    return sites * ((A->channels + IMGDIFF_BLOCK - 1) / IMGDIFF_BLOCK);
}

#define IMGDIFF_INPAINT_BLEND(S, M, HAS_Z, NAME)                                                   \
    IMGDIFF_CLONES static void inpaint_blend_##S##_##M##_##NAME(const void *args, int64_t lo,      \
                                                               int64_t hi) {                       \
        const blend_args *A = args;                                                                \
        const void *restrict x = A->x, *restrict k = A->k, *z = A->z, *restrict m = A->m;          \
        const float ks = A->ks, ns = A->ns;                                                        \
        const int64_t n = A->n, channels = A->channels, plane = A->plane;                          \
        void *out = A->out;                                                                        \
        (void)z;                                                                                   \
        (void)ns;                                                                                  \
        if (A->mode == 0) {                                                                        \
            const int64_t b0 = lo, b1 = hi;                                                        \
            IMGDIFF_BLOCKS(s) {                                                                    \
                const int64_t len = block_len(n, s);                                               \
                float buf[IMGDIFF_BLOCK];                                                          \
                float *t = stage_##S(out, s, buf);                                                 \
                IMGDIFF_BLEND_RUN(S, M, HAS_Z, 1, t, s, len, s);                                   \
                flush_##S(out, s, t, len);                                                         \
            }                                                                                      \
        } else if (A->mode == 1) { /* rows of a plane, in runs; C rows share a mask plane */       \
            const int64_t runs = (plane + IMGDIFF_BLOCK - 1) / IMGDIFF_BLOCK;                      \
            for (int64_t q = lo; q < hi; q++) {                                                    \
                const int64_t r = q / runs, c0 = (q % runs) * IMGDIFF_BLOCK;                       \
                const int64_t i0 = r * plane + c0, len = block_len(plane, c0);                     \
                float buf[IMGDIFF_BLOCK];                                                          \
                float *t = stage_##S(out, i0, buf);                                                \
                IMGDIFF_BLEND_RUN(S, M, HAS_Z, 1, t, i0, len, (r / channels) * plane + c0);        \
                flush_##S(out, i0, t, len);                                                        \
            }                                                                                      \
        } else if (channels <= IMGDIFF_BLOCK) { /* runs of whole sites: C values, one mask */      \
            const int64_t sites = n / channels, per = IMGDIFF_BLOCK / channels;                    \
            for (int64_t q = lo; q < hi; q++) {                                                    \
                const int64_t s0 = q * per, s1 = s0 + per < sites ? s0 + per : sites;              \
                const int64_t i0 = s0 * channels;                                                  \
                float buf[IMGDIFF_BLOCK];                                                          \
                float *t = stage_##S(out, i0, buf);                                                \
                for (int64_t si = s0; si < s1; si++)                                               \
                    IMGDIFF_BLEND_RUN(S, M, HAS_Z, 0, t + (si - s0) * channels, si * channels,     \
                                      channels, si);                                               \
                flush_##S(out, i0, t, (s1 - s0) * channels);                                       \
            }                                                                                      \
        } else { /* sites longer than a block, in runs */                                          \
            const int64_t runs = (channels + IMGDIFF_BLOCK - 1) / IMGDIFF_BLOCK;                   \
            for (int64_t q = lo; q < hi; q++) {                                                    \
                const int64_t si = q / runs, c0 = (q % runs) * IMGDIFF_BLOCK;                      \
                const int64_t i0 = si * channels + c0, len = block_len(channels, c0);              \
                float buf[IMGDIFF_BLOCK];                                                          \
                float *t = stage_##S(out, i0, buf);                                                \
                IMGDIFF_BLEND_RUN(S, M, HAS_Z, 0, t, i0, len, si);                                 \
                flush_##S(out, i0, t, len);                                                        \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    void imgdiff_inpaint_blend_##S##_##M##_##NAME(                                                 \
        const void *x, const void *k, float ks, const void *z, float ns, const void *m, int mode,  \
        int64_t n, int64_t channels, int64_t plane, void *out, int threads) {                      \
        if (n <= 0) return; /* plane, channels may be 0 */                                         \
        const blend_args A = {x, k, z, m, ks, ns, mode, n, channels, plane, out};                  \
        run_team(inpaint_blend_##S##_##M##_##NAME, &A, blend_items(&A), team_size(n, threads));    \
    }
IMGDIFF_INPAINT_BLEND(f32, f32, 1, z)
IMGDIFF_INPAINT_BLEND(f32, f32, 0, nz)
IMGDIFF_INPAINT_BLEND(bf16, f32, 1, z)
IMGDIFF_INPAINT_BLEND(bf16, f32, 0, nz)
IMGDIFF_INPAINT_BLEND(bf16, bf16, 1, z)
IMGDIFF_INPAINT_BLEND(bf16, bf16, 0, nz)
