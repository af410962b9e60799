/* imgdiff's fused CPU kernels as a CPython extension module (imgdiff.kernels.cpu builds it where
 * Python's headers are installed, and falls back to loading cpu_kernels.c through ctypes).
 *
 * A METH_FASTCALL call costs ~0.05 us where a ctypes call with ten arguments costs ~1.3 us, which
 * is a fifth of a whole step at (1, 4, 64, 64). Each function takes its kernel's arguments in the
 * kernel's order: pointers as ints (None: NULL), floats, ints; the GIL is released around calls
 * over 65536 elements (ctypes releases it around every call). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "cpu_kernels.c"

static int nargs_ok(Py_ssize_t got, Py_ssize_t want, const char *name) {
    if (got == want) return 1;
    PyErr_Format(PyExc_TypeError, "%s: expected %zd arguments, got %zd", name, want, got);
    return 0;
}

static void *ptr_arg(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

#define P(i) ptr_arg(args[i])
#define F(i) ((float)PyFloat_AsDouble(args[i]))
#define L(i) ((int64_t)PyLong_AsLongLong(args[i]))
#define I(i) ((int)PyLong_AsLong(args[i]))

/* run a kernel call once the arguments are converted (any conversion error is raised) */
#define IMGDIFF_RUN(N, CALL)                                                                       \
    do {                                                                                           \
        if (PyErr_Occurred()) return NULL;                                                         \
        if ((N) >= 65536) {                                                                        \
            Py_BEGIN_ALLOW_THREADS CALL;                                                           \
            Py_END_ALLOW_THREADS                                                                   \
        } else {                                                                                   \
            CALL;                                                                                  \
        }                                                                                          \
        Py_RETURN_NONE;                                                                            \
    } while (0)

#define IMGDIFF_PY(NAME) static PyObject *py_##NAME(PyObject *self, PyObject *const *args, Py_ssize_t nargs)

#define IMGDIFF_PY_LINCOMB3(S)                                                                     \
    IMGDIFF_PY(lincomb3_##S) {                                                                     \
        (void)self;                                                                                \
        if (!nargs_ok(nargs, 9, "lincomb3_" #S)) return NULL;                                      \
        const void *x = P(0), *y = P(2), *z = P(4);                                                \
        const float a = F(1), b = F(3), c = F(5);                                                  \
        void *out = P(6);                                                                          \
        const int64_t n = L(7);                                                                    \
        const int threads = I(8);                                                                  \
        IMGDIFF_RUN(n, imgdiff_lincomb3_##S(x, a, y, b, z, c, out, n, threads));                   \
    }
IMGDIFF_PY_LINCOMB3(f32)
IMGDIFF_PY_LINCOMB3(bf16)

#define IMGDIFF_PY_EDICT_MIX(S)                                                                    \
    IMGDIFF_PY(edict_mix_##S) {                                                                    \
        (void)self;                                                                                \
        if (!nargs_ok(nargs, 8, "edict_mix_" #S)) return NULL;                                     \
        const void *u = P(0), *v = P(1);                                                           \
        const float alpha = F(2), beta = F(3);                                                     \
        void *uo = P(4), *vo = P(5);                                                               \
        const int64_t n = L(6);                                                                    \
        const int threads = I(7);                                                                  \
        IMGDIFF_RUN(n, imgdiff_edict_mix_##S(u, v, alpha, beta, uo, vo, n, threads));              \
    }
IMGDIFF_PY_EDICT_MIX(f32)
IMGDIFF_PY_EDICT_MIX(bf16)

#define IMGDIFF_PY_EDICT_SUBSTEP_MIX(S)                                                            \
    IMGDIFF_PY(edict_substep_mix_##S) {                                                            \
        (void)self;                                                                                \
        if (!nargs_ok(nargs, 12, "edict_substep_mix_" #S)) return NULL;                            \
        const void *x = P(0), *y = P(1), *e = P(2);                                                \
        const float a = F(3), b = F(4), c = F(5), p = F(6);                                        \
        const int update_x = I(7);                                                                 \
        void *xo = P(8), *yo = P(9);                                                               \
        const int64_t n = L(10);                                                                   \
        const int threads = I(11);                                                                 \
        IMGDIFF_RUN(n, imgdiff_edict_substep_mix_##S(x, y, e, a, b, c, p, update_x, xo, yo, n,     \
                                                     threads));                                    \
    }
IMGDIFF_PY_EDICT_SUBSTEP_MIX(f32)
IMGDIFF_PY_EDICT_SUBSTEP_MIX(bf16)

#define IMGDIFF_PY_INPAINT_BLEND(NAME)                                                             \
    IMGDIFF_PY(inpaint_blend_##NAME) {                                                             \
        (void)self;                                                                                \
        if (!nargs_ok(nargs, 12, "inpaint_blend_" #NAME)) return NULL;                             \
        const void *x = P(0), *k = P(1), *z = P(3), *m = P(5);                                     \
        const float ks = F(2), ns = F(4);                                                          \
        const int mode = I(6);                                                                     \
        const int64_t n = L(7), channels = L(8), plane = L(9);                                     \
        void *out = P(10);                                                                         \
        const int threads = I(11);                                                                 \
        IMGDIFF_RUN(n, imgdiff_inpaint_blend_##NAME(x, k, ks, z, ns, m, mode, n, channels, plane,  \
                                                    out, threads));                                \
    }
IMGDIFF_PY_INPAINT_BLEND(f32_f32_z)
IMGDIFF_PY_INPAINT_BLEND(f32_f32_nz)
IMGDIFF_PY_INPAINT_BLEND(bf16_f32_z)
IMGDIFF_PY_INPAINT_BLEND(bf16_f32_nz)
IMGDIFF_PY_INPAINT_BLEND(bf16_bf16_z)
IMGDIFF_PY_INPAINT_BLEND(bf16_bf16_nz)

IMGDIFF_PY(has_openmp) {
    (void)self;
    (void)args;
    if (!nargs_ok(nargs, 0, "has_openmp")) return NULL;
    return PyBool_FromLong(imgdiff_has_openmp());
}

IMGDIFF_PY(bf16_isa) {
    (void)self;
    (void)args;
    if (!nargs_ok(nargs, 0, "bf16_isa")) return NULL;
    return PyBool_FromLong(imgdiff_bf16_isa());
}

IMGDIFF_PY(clones_here) {
    (void)self;
    (void)args;
    if (!nargs_ok(nargs, 0, "clones_here")) return NULL;
    return PyBool_FromLong(imgdiff_clones_here());
}

#define IMGDIFF_ENTRY(NAME) {#NAME, (PyCFunction)(void (*)(void))py_##NAME, METH_FASTCALL, NULL}

static PyMethodDef imgdiff_methods[] = {
    IMGDIFF_ENTRY(lincomb3_f32),
    IMGDIFF_ENTRY(lincomb3_bf16),
    IMGDIFF_ENTRY(edict_mix_f32),
    IMGDIFF_ENTRY(edict_mix_bf16),
    IMGDIFF_ENTRY(edict_substep_mix_f32),
    IMGDIFF_ENTRY(edict_substep_mix_bf16),
    IMGDIFF_ENTRY(inpaint_blend_f32_f32_z),
    IMGDIFF_ENTRY(inpaint_blend_f32_f32_nz),
    IMGDIFF_ENTRY(inpaint_blend_bf16_f32_z),
    IMGDIFF_ENTRY(inpaint_blend_bf16_f32_nz),
    IMGDIFF_ENTRY(inpaint_blend_bf16_bf16_z),
    IMGDIFF_ENTRY(inpaint_blend_bf16_bf16_nz),
    IMGDIFF_ENTRY(has_openmp),
    IMGDIFF_ENTRY(bf16_isa),
    IMGDIFF_ENTRY(clones_here),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef imgdiff_module = {
    PyModuleDef_HEAD_INIT, "imgdiff_cpu_ext", "imgdiff's fused CPU kernels (see imgdiff.kernels.cpu).",
    -1, imgdiff_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_imgdiff_cpu_ext(void) { return PyModule_Create(&imgdiff_module); }
