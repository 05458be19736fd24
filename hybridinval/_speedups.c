/*
 * The L1 hit path in C: an optional accelerator for hybridinval._cache.
 *
 * A Python-level hit costs one clock read for the lease (about 40 ns of a 100 ns hit, most of
 * it the call into time.monotonic) plus a Python frame. Here the same steps run in one
 * vectorcall: look the key up in the L1 dict, read CLOCK_MONOTONIC (the clock
 * time.monotonic() reads on Linux) and compare it with the lease, set the entry's reference
 * bit, return its value.
 * Anything else (lease run out, key absent, keyword arguments, an unhashable key) goes to the
 * Python method the object stands in for, with the arguments untouched, so behaviour is the
 * Python method's: this file only answers the calls that the Python code would answer from L1
 * without taking a lock.
 *
 * The whole hit runs under the GIL with no call out to Python code, so it is as atomic with
 * respect to the cache's other threads as the Python version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

static PyObject *one;  /* the reference bit's "set" value */

static inline double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- Lease: the deadline until which L1 may answer without a check --------------------- */

typedef struct {
    PyObject_HEAD
    double until;
} LeaseObject;

static PyMemberDef lease_members[] = {
    {"until", T_DOUBLE, offsetof(LeaseObject, until), 0,
     "time.monotonic() value until which L1 may answer without a check"},
    {NULL}
};

static int
lease_init(LeaseObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"until", NULL};
    double until = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|d", kwlist, &until)) {
        return -1;
    }
    self->until = until;
    return 0;
}

static PyTypeObject LeaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hybridinval._speedups.Lease",
    .tp_basicsize = sizeof(LeaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lease(until=0.0): a deadline shared by a cache's hit paths.",
    .tp_members = lease_members,
    .tp_init = (initproc)lease_init,
    .tp_new = PyType_GenericNew,
};

/* -- HitPath: a callable that answers L1 hits and forwards everything else -------------- */

typedef struct {
    PyObject_HEAD
    PyObject *entries;   /* dict: key -> [value, expires_at, referenced, version] */
    LeaseObject *lease;
    PyObject *fallback;  /* the Python method, called with the original arguments */
    Py_ssize_t hits;     /* calls answered here (a counter costs nothing measurable in C) */
    vectorcallfunc vectorcall;
} HitPathObject;

static PyObject *
hitpath_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                   PyObject *kwnames)
{
    HitPathObject *self = (HitPathObject *)callable;
    if (PyVectorcall_NARGS(nargsf) >= 1) {
        PyObject *entry = PyDict_GetItemWithError(self->entries, args[0]);  /* borrowed */
        if (entry != NULL) {
            /* The lease is checked only for a hit: a miss never serves L1. Reading the clock
               after the lookup is as good as before it: the entry was read no later. */
            double until = self->lease->until;
            if (PyList_CheckExact(entry) && PyList_GET_SIZE(entry) >= 3
                && (until == Py_HUGE_VAL || monotonic_now() < until)) {
                PyObject *value = PyList_GET_ITEM(entry, 0);
                PyObject *bit = PyList_GET_ITEM(entry, 2);
                Py_INCREF(value);
                self->hits++;
                if (bit != one) {
                    Py_INCREF(one);
                    PyList_SET_ITEM(entry, 2, one);
                    Py_DECREF(bit);  /* an int: no finalizer can run here */
                }
                return value;
            }
        }
        else if (PyErr_Occurred()) {
            PyErr_Clear();  /* unhashable key: the Python method reports it */
        }
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *
hitpath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", "lease", "fallback", NULL};
    PyObject *entries, *lease, *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O:HitPath", kwlist, &PyDict_Type,
                                     &entries, &LeaseType, &lease, &fallback)) {
        return NULL;
    }
    if (!PyDict_CheckExact(entries)) {
        PyErr_SetString(PyExc_TypeError, "HitPath: entries must be a dict, not a subclass");
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "HitPath: fallback must be callable");
        return NULL;
    }
    HitPathObject *self = (HitPathObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(entries);
    self->entries = entries;
    Py_INCREF(lease);
    self->lease = (LeaseObject *)lease;
    Py_INCREF(fallback);
    self->fallback = fallback;
    self->vectorcall = hitpath_vectorcall;
    return (PyObject *)self;
}

static int
hitpath_traverse(HitPathObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->entries);
    Py_VISIT(self->lease);
    Py_VISIT(self->fallback);
    return 0;
}

static int
hitpath_clear(HitPathObject *self)
{
    Py_CLEAR(self->entries);
    Py_CLEAR(self->lease);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
hitpath_dealloc(HitPathObject *self)
{
    PyObject_GC_UnTrack(self);
    hitpath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
hitpath_wrapped(HitPathObject *self, void *closure)
{
    if (self->fallback == NULL) {
        Py_RETURN_NONE;
    }
    Py_INCREF(self->fallback);
    return self->fallback;
}

static PyObject *
hitpath_doc(HitPathObject *self, void *closure)
{
    if (self->fallback == NULL) {
        Py_RETURN_NONE;
    }
    return PyObject_GetAttrString(self->fallback, "__doc__");
}

static PyMemberDef hitpath_members[] = {
    {"hits", T_PYSSIZET, offsetof(HitPathObject, hits), READONLY,
     "L1 hits answered in C (hits the Python method answered are not included)"},
    {NULL}
};

static PyGetSetDef hitpath_getset[] = {
    {"__wrapped__", (getter)hitpath_wrapped, NULL, "the Python method this stands in for"},
    {"__doc__", (getter)hitpath_doc, NULL, NULL},
    {NULL}
};

static PyObject *
hitpath_repr(HitPathObject *self)
{
    return PyUnicode_FromFormat("<L1 hit path for %R>", self->fallback);
}

static PyTypeObject HitPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hybridinval._speedups.HitPath",
    .tp_basicsize = sizeof(HitPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(HitPathObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = hitpath_new,
    .tp_dealloc = (destructor)hitpath_dealloc,
    .tp_traverse = (traverseproc)hitpath_traverse,
    .tp_clear = (inquiry)hitpath_clear,
    .tp_members = hitpath_members,
    .tp_getset = hitpath_getset,
    .tp_repr = (reprfunc)hitpath_repr,
};

/* -- module ------------------------------------------------------------------------------ */

static PyObject *
speedups_monotonic(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(monotonic_now());
}

static PyMethodDef speedups_methods[] = {
    {"monotonic", speedups_monotonic, METH_NOARGS,
     "The clock the hit path compares leases with (time.monotonic()'s, on Linux)."},
    {NULL}
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hybridinval._speedups",
    .m_doc = "The L1 hit path in C (optional; hybridinval works without it).",
    .m_size = -1,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&LeaseType) < 0 || PyType_Ready(&HitPathType) < 0) {
        return NULL;
    }
    one = PyLong_FromLong(1);
    if (one == NULL) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Lease", (PyObject *)&LeaseType) < 0
        || PyModule_AddObjectRef(m, "HitPath", (PyObject *)&HitPathType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
