/* The evaluation's inner loops in C: exact IoUs of one image's proposals with its ground truth, and
 * COCOeval's greedy matching. Python (segdist/evaluation/kernels.py) does everything else.
 *
 * Exactness contract (checked against pycocotools in tests/test_evaluation.py):
 *   - segm_ious returns, for every (proposal, GT) pair, the very double pycocotools.mask.iou returns:
 *     i / u with i the intersection and u the union (a crowd GT: the proposal's area) as integers,
 *     and 0 when i == 0. Both are integers here too, so one IEEE division gives the same bits.
 *   - box_ious evaluates pycocotools' bbIou formula with the same double operations in the same order.
 *   - greedy_match makes COCOeval.evaluateImg's decisions in its order (see kernels.py).
 *
 * COCO compressed RLE (the string format): counts alternate runs of 0s and 1s in column-major pixel
 * order, starting with 0s; each count is stored as a difference to the count two places before (from
 * the fourth count on) in 5-bit groups, characters '0' (48) upwards, 0x20 = "more follows", 0x10 in
 * the last group = negative. Counts must add up to h * w: anything else is reported as corrupt rather
 * than evaluated (pycocotools would read past the mask, or loop forever).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The foreground of one mask as sorted half-open pixel intervals [start, end), column-major. */
typedef struct {
    int64_t *iv;  /* 2 * n values: start0, end0, start1, end1, ... */
    Py_ssize_t n;
    int64_t area;
    int64_t x0, x1, y0, y1; /* tight box in pixels, inclusive; x0 > x1 when empty */
} Fg;

/* Growable int64 buffer shared by all masks of a call. */
typedef struct {
    int64_t *data;
    Py_ssize_t len, cap;
} Buf;

static int buf_push2(Buf *b, int64_t a, int64_t c) {
    if (b->len + 2 > b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 1024;
        while (cap < b->len + 2) cap *= 2;
        int64_t *d = realloc(b->data, (size_t)cap * sizeof(int64_t));
        if (!d) return -1;
        b->data = d;
        b->cap = cap;
    }
    b->data[b->len++] = a;
    b->data[b->len++] = c;
    return 0;
}

/* Decodes one compressed RLE string, appending its foreground intervals to buf and filling fg
 * (all but fg->iv: buf may still move; the caller sets it once every mask is decoded). Returns 0, or
 * -1 with a Python error set. */
static int decode_rle(const char *s, Py_ssize_t len, int64_t h, int64_t w, Buf *buf, Fg *fg,
                      const char *what, Py_ssize_t index) {
    int64_t total = h * w, pos = 0, prev2 = 0, prev1 = 0;
    Py_ssize_t p = 0, m = 0;
    fg->iv = NULL;
    fg->n = 0;
    fg->area = 0;
    fg->x0 = fg->y0 = INT64_MAX;
    fg->x1 = fg->y1 = -1;
    while (p < len) {
        int64_t x = 0;
        int k = 0, more = 1;
        while (more) {
            if (p >= len || k >= 12) goto corrupt;
            int c = (unsigned char)s[p] - 48;
            if (c < 0 || c > 63) goto corrupt;
            x |= (int64_t)(c & 0x1f) << (5 * k);
            more = c & 0x20;
            p++;
            k++;
            if (!more && (c & 0x10)) x |= (int64_t)(-1) * ((int64_t)1 << (5 * k)); /* sign */
        }
        if (m > 2) x += prev2; /* stored as a difference to the count two places before */
        if (x < 0 || x > total - pos) goto corrupt;
        if ((m & 1) && x > 0) { /* a run of 1s: pixels [pos, pos + x) */
            int64_t a = pos, b = pos + x;
            if (buf_push2(buf, a, b) < 0) { PyErr_NoMemory(); return -1; }
            fg->n++;
            fg->area += x;
            int64_t xa = a / h, xb = (b - 1) / h;
            if (xa < fg->x0) fg->x0 = xa;
            if (xb > fg->x1) fg->x1 = xb;
            if (xa != xb) { /* spans a column boundary: touches the top and bottom rows */
                fg->y0 = 0;
                fg->y1 = h - 1;
            } else {
                if (a % h < fg->y0) fg->y0 = a % h;
                if ((b - 1) % h > fg->y1) fg->y1 = (b - 1) % h;
            }
        }
        pos += x;
        prev2 = prev1;
        prev1 = x;
        m++;
    }
    if (pos != total) goto corrupt;
    return 0;
corrupt:
    PyErr_Format(PyExc_ValueError, "%s %zd: corrupt COCO RLE string (counts must be valid and add up "
                 "to height x width = %lld x %lld)", what, index, (long long)h, (long long)w);
    return -1;
}

/* Decodes a list of bytes objects (taken in `order` when given) into fgs, intervals into buf. */
static int decode_list(PyObject *list, const int64_t *order, Py_ssize_t n, int64_t h, int64_t w,
                       Buf *buf, Fg *fgs, const char *what) {
    Py_ssize_t size = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t j = order ? (Py_ssize_t)order[i] : i;
        if (j < 0 || j >= size) {
            PyErr_Format(PyExc_IndexError, "%s order index %zd out of range", what, j);
            return -1;
        }
        char *s;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(list, j), &s, &len) < 0) return -1;
        if (decode_rle(s, len, h, w, buf, &fgs[i], what, j) < 0) return -1;
    }
    return 0;
}

/* Intersection of two interval lists, walking only the part of `a` that can meet `b`. */
static int64_t intersect(const Fg *a, const Fg *b) {
    if (a->n == 0 || b->n == 0) return 0;
    const int64_t *A = a->iv, *B = b->iv;
    int64_t lo = B[0], hi = B[2 * b->n - 1];
    /* first interval of a that ends after lo (binary search) */
    Py_ssize_t l = 0, r = a->n;
    while (l < r) {
        Py_ssize_t mid = (l + r) / 2;
        if (A[2 * mid + 1] <= lo) l = mid + 1; else r = mid;
    }
    Py_ssize_t i = l, j = 0;
    int64_t inter = 0;
    while (i < a->n && j < b->n) {
        int64_t s = A[2 * i] > B[2 * j] ? A[2 * i] : B[2 * j];
        int64_t e = A[2 * i + 1] < B[2 * j + 1] ? A[2 * i + 1] : B[2 * j + 1];
        if (e > s) inter += e - s;
        if (A[2 * i + 1] < B[2 * j + 1]) {
            i++;
            if (i < a->n && A[2 * i] >= hi) break;
        } else {
            j++;
        }
    }
    return inter;
}

static int as_uint8(Py_buffer *b, Py_ssize_t n, const char *name) {
    if (b->len != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, n, b->len);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(segm_ious_doc,
"segm_ious(dt_counts, order, gt_counts, height, width, crowd, out)\n\n"
"Exact mask IoUs, as pycocotools.mask.iou. dt_counts, gt_counts: lists of compressed RLE bytes;\n"
"order: int64[D] indices into dt_counts (the detections, in score order); crowd: uint8[G];\n"
"out: writable float64[D * G], row-major (detection, GT). Raises ValueError for a corrupt RLE.");

static PyObject *segm_ious(PyObject *self, PyObject *args) {
    PyObject *dts, *gts;
    Py_buffer order = {0}, crowd = {0}, out = {0};
    long long h, w;
    if (!PyArg_ParseTuple(args, "O!y*O!LLy*w*", &PyList_Type, &dts, &order, &PyList_Type, &gts,
                          &h, &w, &crowd, &out))
        return NULL;
    PyObject *result = NULL;
    Buf buf = {0};
    Fg *fd = NULL, *fg = NULL;
    Py_ssize_t D = order.len / (Py_ssize_t)sizeof(int64_t), G = PyList_GET_SIZE(gts);
    if (h < 1 || w < 1) { PyErr_SetString(PyExc_ValueError, "height and width must be >= 1"); goto done; }
    if (as_uint8(&crowd, G, "crowd") < 0) goto done;
    if (out.len != D * G * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "out must hold D * G float64");
        goto done;
    }
    fd = malloc((size_t)(D ? D : 1) * sizeof(Fg));
    fg = malloc((size_t)(G ? G : 1) * sizeof(Fg));
    if (!fd || !fg) { PyErr_NoMemory(); goto done; }
    /* GT first, then detections, into one buffer (pointers set after both: realloc moves it). */
    if (decode_list(gts, NULL, G, h, w, &buf, fg, "ground truth") < 0) goto done;
    if (decode_list(dts, (const int64_t *)order.buf, D, h, w, &buf, fd, "proposal") < 0) goto done;
    {
        Py_ssize_t off = 0; /* the intervals lie in buf in decoding order */
        for (Py_ssize_t g = 0; g < G; g++) { fg[g].iv = buf.data + off; off += 2 * fg[g].n; }
        for (Py_ssize_t d = 0; d < D; d++) { fd[d].iv = buf.data + off; off += 2 * fd[d].n; }
    }
    double *o = (double *)out.buf;
    const uint8_t *cr = (const uint8_t *)crowd.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t d = 0; d < D; d++) {
        const Fg *a = &fd[d];
        for (Py_ssize_t g = 0; g < G; g++) {
            const Fg *b = &fg[g];
            double v = 0.0;
            /* Disjoint boxes cannot share a pixel. */
            if (a->n && b->n && a->x0 <= b->x1 && b->x0 <= a->x1 && a->y0 <= b->y1 && b->y0 <= a->y1) {
                int64_t i = intersect(a, b);
                if (i > 0) {
                    int64_t u = cr[g] ? a->area : a->area + b->area - i;
                    v = (double)i / (double)u;
                }
            }
            o[d * G + g] = v;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(buf.data);
    free(fd);
    free(fg);
    PyBuffer_Release(&order);
    PyBuffer_Release(&crowd);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(box_ious_doc,
"box_ious(dt, gt, crowd, out)\n\n"
"Box IoUs, as pycocotools.mask.iou on [x, y, w, h] boxes. dt: float64[D * 4]; gt: float64[G * 4];\n"
"crowd: uint8[G]; out: writable float64[D * G], row-major (detection, GT).");

static PyObject *box_ious(PyObject *self, PyObject *args) {
    Py_buffer dtb = {0}, gtb = {0}, crowd = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "y*y*y*w*", &dtb, &gtb, &crowd, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t D = dtb.len / (Py_ssize_t)(4 * sizeof(double)), G = gtb.len / (Py_ssize_t)(4 * sizeof(double));
    if (as_uint8(&crowd, G, "crowd") < 0) goto done;
    if (out.len != D * G * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "out must hold D * G float64");
        goto done;
    }
    const double *dt = (const double *)dtb.buf, *gt = (const double *)gtb.buf;
    const uint8_t *cr = (const uint8_t *)crowd.buf;
    double *o = (double *)out.buf;
    for (Py_ssize_t d = 0; d < D; d++) {
        const double *b = dt + 4 * d;
        double da = b[2] * b[3];
        for (Py_ssize_t g = 0; g < G; g++) {
            const double *q = gt + 4 * g;
            double ga = q[2] * q[3], v = 0.0;
            /* the same operations in the same order as pycocotools' bbIou */
            double ww = (b[2] + b[0] < q[2] + q[0] ? b[2] + b[0] : q[2] + q[0]) - (b[0] > q[0] ? b[0] : q[0]);
            if (ww > 0) {
                double hh = (b[3] + b[1] < q[3] + q[1] ? b[3] + b[1] : q[3] + q[1]) - (b[1] > q[1] ? b[1] : q[1]);
                if (hh > 0) {
                    double i = ww * hh;
                    double u = cr[g] ? da : da + ga - i;
                    v = i / u;
                }
            }
            o[d * G + g] = v;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&dtb);
    PyBuffer_Release(&gtb);
    PyBuffer_Release(&crowd);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(greedy_match_doc,
"greedy_match(ious, n_gt, ignore, crowd, thresholds, out)\n\n"
"COCOeval's matching. ious: float64[D * G] (rows: detections in score order; columns: GTs in\n"
"COCOeval's order); ignore, crowd: uint8[G]; thresholds: float64[T], already capped at 1 - 1e-10;\n"
"out: writable int64[T * D], set to the matched GT's column or -1.");

static PyObject *greedy_match(PyObject *self, PyObject *args) {
    Py_buffer iob = {0}, ignb = {0}, crb = {0}, thb = {0}, out = {0};
    Py_ssize_t G;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*w*", &iob, &G, &ignb, &crb, &thb, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t *walk = NULL;
    uint8_t *taken = NULL;
    double *best = NULL;
    Py_ssize_t T = thb.len / (Py_ssize_t)sizeof(double);
    Py_ssize_t D = G ? iob.len / (Py_ssize_t)sizeof(double) / G : 0;
    if (G < 0 || (G && iob.len != D * G * (Py_ssize_t)sizeof(double))) {
        PyErr_SetString(PyExc_ValueError, "ious must hold D * G float64");
        goto done;
    }
    if (as_uint8(&ignb, G, "ignore") < 0 || as_uint8(&crb, G, "crowd") < 0) goto done;
    if (G == 0) D = (out.len / (Py_ssize_t)sizeof(int64_t)) / (T ? T : 1);
    if (out.len != T * D * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "out must hold T * D int64");
        goto done;
    }
    const double *iou = (const double *)iob.buf, *thr = (const double *)thb.buf;
    const uint8_t *ign = (const uint8_t *)ignb.buf, *cr = (const uint8_t *)crb.buf;
    int64_t *o = (int64_t *)out.buf;
    for (Py_ssize_t k = 0; k < T * D; k++) o[k] = -1;
    if (G == 0 || D == 0) goto ok;
    walk = malloc((size_t)G * sizeof(Py_ssize_t));
    taken = malloc((size_t)G);
    best = malloc((size_t)D * sizeof(double));
    if (!walk || !taken || !best) { PyErr_NoMemory(); goto done; }
    /* COCOeval's walk order: not-ignored GTs first, then ignored ones, each in their order. */
    Py_ssize_t nw = 0;
    for (Py_ssize_t g = 0; g < G; g++) if (!ign[g]) walk[nw++] = g;
    for (Py_ssize_t g = 0; g < G; g++) if (ign[g]) walk[nw++] = g;
    for (Py_ssize_t d = 0; d < D; d++) {
        double b = -1.0;
        for (Py_ssize_t g = 0; g < G; g++) if (iou[d * G + g] > b) b = iou[d * G + g];
        best[d] = b;
    }
    for (Py_ssize_t t = 0; t < T; t++) {
        memset(taken, 0, (size_t)G);
        for (Py_ssize_t d = 0; d < D; d++) {
            /* No GT reaches t: COCOeval's walk keeps nothing either (and a GT held is needed
             * for its early stop), so the detection is skipped. */
            if (best[d] < thr[t]) continue;
            const double *row = iou + d * G;
            double bound = thr[t];
            Py_ssize_t m = -1;
            for (Py_ssize_t k = 0; k < G; k++) {
                Py_ssize_t g = walk[k];
                if (taken[g] && !cr[g]) continue;
                if (m > -1 && !ign[m] && ign[g]) break;
                if (row[g] < bound) continue;
                bound = row[g];
                m = g;
            }
            if (m < 0) continue;
            taken[m] = 1;
            o[t * D + d] = m;
        }
    }
ok:
    result = Py_None;
    Py_INCREF(result);
done:
    free(walk);
    free(taken);
    free(best);
    PyBuffer_Release(&iob);
    PyBuffer_Release(&ignb);
    PyBuffer_Release(&crb);
    PyBuffer_Release(&thb);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(add_hits_doc,
"add_hits(match, countable, hits, n_areas, max_dets, area)\n\n"
"Adds true positives to hits[:, area, :D]. match: int64[T * D] from greedy_match; countable:\n"
"uint8[G], 1 where a match counts (GT not ignored, GT id not 0); hits: writable int64[T * A * M].");

static PyObject *add_hits(PyObject *self, PyObject *args) {
    Py_buffer mb = {0}, cb = {0}, hb = {0};
    Py_ssize_t A, M, area;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn", &mb, &cb, &hb, &A, &M, &area)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t G = cb.len, n = mb.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t T = (A > 0 && M > 0) ? hb.len / (Py_ssize_t)sizeof(int64_t) / (A * M) : 0;
    if (A < 1 || M < 1 || area < 0 || area >= A || hb.len != T * A * M * (Py_ssize_t)sizeof(int64_t)
        || T < 1 || n % T || n / T > M) {
        PyErr_SetString(PyExc_ValueError, "add_hits: inconsistent shapes");
        goto done;
    }
    Py_ssize_t D = n / T;
    const int64_t *m = (const int64_t *)mb.buf;
    const uint8_t *ok = (const uint8_t *)cb.buf;
    int64_t *h = (int64_t *)hb.buf;
    for (Py_ssize_t t = 0; t < T; t++) {
        int64_t *row = h + (t * A + area) * M;
        for (Py_ssize_t d = 0; d < D; d++) {
            int64_t g = m[t * D + d];
            if (g >= G) { PyErr_SetString(PyExc_ValueError, "add_hits: GT index out of range"); goto done; }
            if (g >= 0 && ok[g]) row[d] += 1;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&mb);
    PyBuffer_Release(&cb);
    PyBuffer_Release(&hb);
    return result;
}

static PyMethodDef methods[] = {
    {"add_hits", add_hits, METH_VARARGS, add_hits_doc},
    {"segm_ious", segm_ious, METH_VARARGS, segm_ious_doc},
    {"box_ious", box_ious, METH_VARARGS, box_ious_doc},
    {"greedy_match", greedy_match, METH_VARARGS, greedy_match_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "segdist's exact evaluation kernels (see segdist/evaluation/kernels.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
