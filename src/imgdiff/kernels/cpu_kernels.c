/* imgdiff's fused CPU kernels: the sampler updates of imgdiff/kernels/reference.py in one pass.
 *
 * Compiled on first use by imgdiff/kernels/cpu.py with the system C compiler (-O3, OpenMP when
 * the compiler has it), as a CPython extension module with cpu_module.c's entry points where
 * Python's headers are installed, else as a shared library called through ctypes. Every function reads each input once and
 * writes each output once, computes in float32 whatever the storage (float32 or bfloat16), and
 * splits the elements over `threads` OpenMP threads for large tensors. Pointers address dense
 * memory of `n` elements in one shared layout (the Python side checks it).
 *
 * On x86-64 Linux each function is built three times (AVX-512, AVX2/FMA and baseline; GCC
 * target_clones) and the loader picks the one the processor runs. AVX-512 matters for bfloat16,
 * whose conversions make the loops compute-bound; float32 is bound by memory either way.
 * Compilers that reject the clones build with IMGDIFF_NO_CLONES (baseline only).
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(IMGDIFF_NO_CLONES)
#define IMGDIFF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMGDIFF_CLONES
#endif

#if defined(_OPENMP)
#define IMGDIFF_PARALLEL _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && n >= 65536)")
#else
#define IMGDIFF_PARALLEL
#endif

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

/* out = a x + b y (+ c z when z is not NULL): DDIM, fixed-variance DDPM, conversions. */
#define IMGDIFF_LINCOMB3(S)                                                                        \
    IMGDIFF_CLONES void imgdiff_lincomb3_##S(const void *restrict x, float a, const void *restrict y, \
                                             float b, const void *restrict z, float c,             \
                                             void *restrict out, int64_t n, int threads) {         \
        if (z) {                                                                                   \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t i = 0; i < n; i++)                                                        \
                st_##S(out, i, a * ld_##S(x, i) + b * ld_##S(y, i) + c * ld_##S(z, i));            \
        } else {                                                                                   \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t i = 0; i < n; i++) st_##S(out, i, a * ld_##S(x, i) + b * ld_##S(y, i));   \
        }                                                                                          \
    }
IMGDIFF_LINCOMB3(f32)
IMGDIFF_LINCOMB3(bf16)

/* EDICT's mixing pair in its general form: u' = alpha u + beta v, then v' = alpha v + beta u'.
 * alpha = p, beta = 1 - p is the mixing layer (Wallace et al. 2023, eq. 13) on (x, y); called on
 * (y, x) with alpha = 1/p, beta = -(1-p)/p it is its exact inverse, y first (algorithms spec
 * 4.3). */
#define IMGDIFF_EDICT_MIX(S)                                                                       \
    IMGDIFF_CLONES void imgdiff_edict_mix_##S(const void *restrict u, const void *restrict v,      \
                                              float alpha, float beta, void *restrict uo,          \
                                              void *restrict vo, int64_t n, int threads) {         \
        IMGDIFF_PARALLEL                                                                           \
        for (int64_t i = 0; i < n; i++) {                                                          \
            const float uv = ld_##S(u, i), vv = ld_##S(v, i);                                      \
            const float un = alpha * uv + beta * vv;                                               \
            st_##S(uo, i, un);                                                                     \
            st_##S(vo, i, alpha * vv + beta * un);                                                 \
        }                                                                                          \
    }
IMGDIFF_EDICT_MIX(f32)
IMGDIFF_EDICT_MIX(bf16)

/* EDICT's second affine sub-step and the mixing pair (Wallace et al. 2023, eq. 10-13): the
 * sequence being updated (x when update_x, else y) becomes a z + b e + c w, w the other one (c is
 * 0 for epsilon models; others fold their eps estimate's input term into it), then the mixing
 * pair. The updated value stays in float32 for the mixing. */
#define IMGDIFF_EDICT_SUBSTEP_MIX(S)                                                               \
    IMGDIFF_CLONES void imgdiff_edict_substep_mix_##S(                                             \
        const void *restrict x, const void *restrict y, const void *restrict e, float a, float b,  \
        float c, float p, int update_x, void *restrict xo, void *restrict yo, int64_t n,           \
        int threads) {                                                                             \
        const float q = 1.0f - p;                                                                  \
        if (update_x) {                                                                            \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t i = 0; i < n; i++) {                                                      \
                const float yv = ld_##S(y, i), xv = a * ld_##S(x, i) + b * ld_##S(e, i) + c * yv;  \
                const float xn = p * xv + q * yv;                                                  \
                st_##S(xo, i, xn);                                                                 \
                st_##S(yo, i, p * yv + q * xn);                                                    \
            }                                                                                      \
        } else {                                                                                   \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t i = 0; i < n; i++) {                                                      \
                const float xv = ld_##S(x, i), yv = a * ld_##S(y, i) + b * ld_##S(e, i) + c * xv;  \
                const float xn = p * xv + q * yv;                                                  \
                st_##S(xo, i, xn);                                                                 \
                st_##S(yo, i, p * yv + q * xn);                                                    \
            }                                                                                      \
        }                                                                                          \
    }
IMGDIFF_EDICT_SUBSTEP_MIX(f32)
IMGDIFF_EDICT_SUBSTEP_MIX(bf16)

/* out = (1 - m) x + m (ks k + ns z): Palette's clean paste and RePaint's noised paste.
 * mode 0: the mask has x's shape and layout; 1: (B, 1, S) against contiguous (B, C, S);
 * 2: (B, 1, S) against channels-last (B, S, C) memory. n elements; channels = C (modes 1, 2) and
 * plane = S (mode 1) say how the mask broadcasts, and are not read in mode 0. One
 * function per storage S, mask storage M (float32, or S) and with (z) or without (nz) noise, so
 * the inner loops carry no per-element branches. */
#define IMGDIFF_BLEND_AT(S, M, HAS_Z, I, MI)                                                       \
    do {                                                                                           \
        const float mv = ld_##M(m, (MI)), xv = ld_##S(x, (I));                                     \
        float pv = ks * ld_##S(k, (I));                                                            \
        if (HAS_Z) pv += ns * ld_##S(z, (I));                                                      \
        st_##S(out, (I), xv * (1.0f - mv) + pv * mv);                                              \
    } while (0)

#define IMGDIFF_INPAINT_BLEND(S, M, HAS_Z, NAME)                                                   \
    IMGDIFF_CLONES void imgdiff_inpaint_blend_##S##_##M##_##NAME(                                  \
        const void *restrict x, const void *restrict k, float ks, const void *restrict z,          \
        float ns, const void *restrict m, int mode, int64_t n, int64_t channels, int64_t plane,    \
        void *restrict out, int threads) {                                                         \
        (void)z;                                                                                   \
        (void)ns;                                                                                  \
        if (n <= 0) return; /* plane, channels may be 0 */                                         \
        if (mode == 0) {                                                                           \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t i = 0; i < n; i++) IMGDIFF_BLEND_AT(S, M, HAS_Z, i, i);                   \
        } else if (mode == 1) {                                                                    \
            const int64_t rows = n / plane;                                                        \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t r = 0; r < rows; r++) {                                                   \
                const int64_t base = r * plane, mbase = (r / channels) * plane;                    \
                for (int64_t j = 0; j < plane; j++)                                                \
                    IMGDIFF_BLEND_AT(S, M, HAS_Z, base + j, mbase + j);                            \
            }                                                                                      \
        } else {                                                                                   \
            const int64_t sites = n / channels;                                                    \
            IMGDIFF_PARALLEL                                                                       \
            for (int64_t s = 0; s < sites; s++) {                                                  \
                const int64_t base = s * channels;                                                 \
                for (int64_t j = 0; j < channels; j++)                                             \
                    IMGDIFF_BLEND_AT(S, M, HAS_Z, base + j, s);                                    \
            }                                                                                      \
        }                                                                                          \
    }
IMGDIFF_INPAINT_BLEND(f32, f32, 1, z)
IMGDIFF_INPAINT_BLEND(f32, f32, 0, nz)
IMGDIFF_INPAINT_BLEND(bf16, f32, 1, z)
IMGDIFF_INPAINT_BLEND(bf16, f32, 0, nz)
IMGDIFF_INPAINT_BLEND(bf16, bf16, 1, z)
IMGDIFF_INPAINT_BLEND(bf16, bf16, 0, nz)
