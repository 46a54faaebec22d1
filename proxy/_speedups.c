/* pgsidecar's compiled hot path: the relay's two framing loops, run for every read.
 *
 * answer(data) is proxy.frames.answer_py in C: it frames the PostgreSQL backend messages of one
 * read and says whether the read is a whole, uneventful answer (the relay's fast path).
 * messages(buf, max_message) is proxy.frames.messages_py: the whole frontend messages of a client's
 * read, for the relay's loop. The Python twins are the reference; tests/unit/test_frames.py holds
 * the two to the same results on generated input. The extension is optional: without a C compiler the package uses the twin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* answer(data: bytes) -> (data_rows, tag) | None
 *
 * None unless ``data`` holds only whole messages, each of length >= 4, ending with the only
 * ReadyForQuery ('Z') in it, with no ErrorResponse ('E'), no ParameterStatus ('S') and at most
 * one CommandComplete ('C'). Otherwise: the number of DataRows ('D') and the CommandComplete's
 * tag without its NUL (None when there is no CommandComplete).
 */
static PyObject *
answer(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, pos = 0, last_c = -1, rows = 0, zs = 0;
    unsigned char t = 0;
    uint32_t length;
    PyObject *tag, *result;
    int owned = 0;

    if (PyBytes_CheckExact(arg)) {
        p = (const unsigned char *)PyBytes_AS_STRING(arg);
        n = PyBytes_GET_SIZE(arg);
    } else {
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        p = (const unsigned char *)view.buf;
        n = view.len;
        owned = 1;
    }
    while (n - pos >= 5) {
        t = p[pos];
        length = ((uint32_t)p[pos + 1] << 24) | ((uint32_t)p[pos + 2] << 16)
                 | ((uint32_t)p[pos + 3] << 8) | (uint32_t)p[pos + 4];
        if (length < 4)
            goto not_eligible;
        switch (t) {
        case 'D':
            rows++;
            break;
        case 'E':
        case 'S':
            goto not_eligible;
        case 'Z':
            zs++;
            break;
        case 'C':
            if (last_c >= 0)
                goto not_eligible;
            last_c = pos;
            break;
        }
        pos += 1 + (Py_ssize_t)length;
    }
    if (pos != n || t != 'Z' || zs != 1)
        goto not_eligible;
    if (last_c >= 0) {
        length = ((uint32_t)p[last_c + 1] << 24) | ((uint32_t)p[last_c + 2] << 16)
                 | ((uint32_t)p[last_c + 3] << 8) | (uint32_t)p[last_c + 4];
        /* The tag runs from after the length to before the NUL that ends the message. */
        tag = PyBytes_FromStringAndSize((const char *)p + last_c + 5, (Py_ssize_t)length - 5 > 0 ? (Py_ssize_t)length - 5 : 0);
        if (tag == NULL)
            goto error;
    } else {
        tag = Py_NewRef(Py_None);
    }
    if (owned)
        PyBuffer_Release(&view);
    result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(tag);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, PyLong_FromSsize_t(rows));
    PyTuple_SET_ITEM(result, 1, tag);
    if (PyTuple_GET_ITEM(result, 0) == NULL) {
        Py_DECREF(result);
        return NULL;
    }
    return result;

not_eligible:
    if (owned)
        PyBuffer_Release(&view);
    Py_RETURN_NONE;
error:
    if (owned)
        PyBuffer_Release(&view);
    return NULL;
}


/* messages(buf, max_message) -> (frames, stop, bad_length)
 *
 * The whole frontend messages at the start of ``buf``: ``frames`` lists (type, start, end) for
 * each, ``stop`` is where the framing stopped (the end of the last whole message, or the start
 * of the first one with a bad length), and ``bad_length`` is that bad length (under 4 or over
 * ``max_message``), else -1.
 */
static PyObject *
messages(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p;
    Py_ssize_t n, pos = 0, end, max_message;
    long long bad = -1;
    uint32_t length;
    PyObject *list, *item, *result;
    int owned = 0;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "messages(buf, max_message) takes two arguments");
        return NULL;
    }
    max_message = PyLong_AsSsize_t(args[1]);
    if (max_message == -1 && PyErr_Occurred())
        return NULL;
    if (PyBytes_CheckExact(args[0])) {
        p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
        n = PyBytes_GET_SIZE(args[0]);
    } else {
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
            return NULL;
        p = (const unsigned char *)view.buf;
        n = view.len;
        owned = 1;
    }
    list = PyList_New(0);
    if (list == NULL)
        goto error;
    while (n - pos >= 5) {
        length = ((uint32_t)p[pos + 1] << 24) | ((uint32_t)p[pos + 2] << 16)
                 | ((uint32_t)p[pos + 3] << 8) | (uint32_t)p[pos + 4];
        if (length < 4 || (Py_ssize_t)length > max_message) {
            bad = (long long)length;
            break;
        }
        end = pos + 1 + (Py_ssize_t)length;
        if (end > n)
            break;
        item = Py_BuildValue("(inn)", (int)p[pos], pos, end);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            goto error;
        }
        Py_DECREF(item);
        pos = end;
    }
    if (owned)
        PyBuffer_Release(&view);
    result = Py_BuildValue("(NnL)", list, pos, bad);
    return result;

error:
    if (owned)
        PyBuffer_Release(&view);
    return NULL;
}

/* Byte classes for shape_plain: what \w matches in a bytes pattern (ASCII letters, digits, '_'),
 * the digits, and the bytes that send a text to the Python path ('"$\-/). */
#define WORD 1
#define DIGIT 2
#define NOT_PLAIN 4
static unsigned char classes[256];

static void
init_classes(void)
{
    int c;
    for (c = '0'; c <= '9'; c++)
        classes[c] = WORD | DIGIT;
    for (c = 'a'; c <= 'z'; c++)
        classes[c] = WORD;
    for (c = 'A'; c <= 'Z'; c++)
        classes[c] = WORD;
    classes['_'] = WORD;
    classes['\''] = classes['"'] = classes['$'] = classes['\\'] = classes['-'] = classes['/'] = NOT_PLAIN;
}

/* The end of the digits from ``i``. */
static Py_ssize_t
digits_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    while (i < n && (classes[p[i]] & DIGIT))
        i++;
    return i;
}

/* The end of the number that starts at ``i`` (a digit no word byte precedes), or -1. The forms,
 * longest first as the regex engine backtracks: digits.digits with an exponent, without, then
 * digits with an exponent, without; the first that a non-word byte (or the end) follows. */
static Py_ssize_t
number_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, int strict)
{
    Py_ssize_t bases[2], base, m;
    int b;

    bases[1] = digits_end(p, i, n);
    bases[0] = -1;
    if (bases[1] + 1 < n && p[bases[1]] == '.' && (classes[p[bases[1] + 1]] & DIGIT))
        bases[0] = digits_end(p, bases[1] + 1, n);
    for (b = 0; b < 2; b++) {
        base = bases[b];
        if (base < 0)
            continue;
        if (base < n && (p[base] == 'e' || p[base] == 'E')) {
            m = base + 1;
            if (m < n && (p[m] == '+' || (!strict && p[m] == '-'))) /* strict: a '-' sends the text to Python */
                m++;
            if (m < n && (classes[p[m]] & DIGIT)) {
                m = digits_end(p, m, n);
                if (m == n || !(classes[p[m]] & WORD))
                    return m;
            }
        }
        if (base == n || !(classes[p[base]] & WORD))
            return base;
    }
    return -1;
}

/* A text's shape being written: the literals found so far replaced by "?", the output made on
 * the first one (a text with none is its own shape). */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    Py_ssize_t run; /* start of the input not copied yet */
    Py_ssize_t out;
    unsigned char *o;
    PyObject *result;
} Shaper;

static int
shaper_begin(Shaper *sh, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "a text's shape needs bytes");
        return -1;
    }
    sh->p = (const unsigned char *)PyBytes_AS_STRING(arg);
    sh->n = PyBytes_GET_SIZE(arg);
    sh->run = sh->out = 0;
    sh->o = NULL;
    sh->result = NULL;
    return 0;
}

/* Replace the input from ``start`` to ``end`` by "?". */
static int
shaper_mark(Shaper *sh, Py_ssize_t start, Py_ssize_t end)
{
    if (sh->result == NULL) {
        sh->result = PyBytes_FromStringAndSize(NULL, sh->n);
        if (sh->result == NULL)
            return -1;
        sh->o = (unsigned char *)PyBytes_AS_STRING(sh->result);
    }
    memcpy(sh->o + sh->out, sh->p + sh->run, (size_t)(start - sh->run));
    sh->out += start - sh->run;
    sh->o[sh->out++] = '?';
    sh->run = end;
    return 0;
}

static PyObject *
shaper_none(Shaper *sh)
{
    Py_XDECREF(sh->result);
    Py_RETURN_NONE;
}

static PyObject *
shaper_finish(Shaper *sh, PyObject *arg)
{
    if (sh->result == NULL)
        return Py_NewRef(arg);
    memcpy(sh->o + sh->out, sh->p + sh->run, (size_t)(sh->n - sh->run));
    sh->out += sh->n - sh->run;
    if (_PyBytes_Resize(&sh->result, sh->out) < 0)
        return NULL;
    return sh->result;
}

/* The shape of ``sql`` with its numbers made "?", or None (the Python path decides). None when
 * ``sql`` holds a byte of '"$\; and when ``strict``, a '-' or a '/' too, else only a "--" or a "/*"
 * (a comment). A number starts at a digit that no ASCII word byte precedes (number_end says
 * where it ends); a digit run that is no number stays as it is (none of its digits can start one).
 */
static PyObject *
shape(PyObject *arg, int strict)
{
    Shaper sh;
    const unsigned char *p;
    Py_ssize_t n, i = 0, end;
    unsigned char c, cls, previous = 0;

    if (shaper_begin(&sh, arg) < 0)
        return NULL;
    p = sh.p;
    n = sh.n;
    while (i < n) {
        c = p[i];
        cls = classes[c];
        if ((cls & NOT_PLAIN)
            && (strict || !(c == '-' || c == '/') || (i + 1 < n && p[i + 1] == (c == '-' ? '-' : '*'))))
            return shaper_none(&sh);
        if (!(cls & DIGIT) || (previous & WORD)) {
            previous = cls;
            i++;
            continue;
        }
        end = number_end(p, i, n, strict);
        if (end < 0) {
            i = digits_end(p, i, n);
            previous = WORD;
            continue;
        }
        if (shaper_mark(&sh, i, end) < 0)
            return NULL;
        i = end;
        previous = 0; /* a number ends before a non-word byte */
    }
    return shaper_finish(&sh, arg);
}

/* The end of the quoted string that starts at ``i`` ('...' with '' for a quote), or -1: the
 * first lone quote closes it; an unterminated string ends after the first quote of its last ''
 * (where the regex engine's greedy loop backtracks to), or does not match at all without one.
 */
static Py_ssize_t
string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    Py_ssize_t j = i + 1, last_pair = -1;
    while (j < n) {
        if (p[j] != '\'') {
            j++;
        } else if (j + 1 < n && p[j + 1] == '\'') {
            last_pair = j;
            j += 2;
        } else {
            return j + 1;
        }
    }
    return last_pair >= 0 ? last_pair + 1 : -1;
}

/* shape_quoted(sql) -> bytes | None: proxy.fingerprint.shape_quoted_py, the regex _SHAPE with "?"
 * for every match, for a text with no '"', '$', backslash, "--" or "/*" (None for the others):
 * each '...' string and each number becomes "?". A number here starts at a digit that no word
 * byte and no '.' precedes, and ends where no word byte follows (number_end, exponent sign + or -).
 */
static PyObject *
shape_quoted(PyObject *module, PyObject *arg)
{
    Shaper sh;
    const unsigned char *p;
    Py_ssize_t n, i, end;
    unsigned char c;

    if (shaper_begin(&sh, arg) < 0)
        return NULL;
    p = sh.p;
    n = sh.n;
    /* First the bytes that send the text to the regex: a match found before one of them would
     * have been shaped in vain. */
    for (i = 0; i < n; i++) {
        c = p[i];
        if (c == '"' || c == '$' || c == '\\' || (i + 1 < n && ((c == '-' && p[i + 1] == '-') || (c == '/' && p[i + 1] == '*'))))
            Py_RETURN_NONE;
    }
    i = 0;
    while (i < n) {
        c = p[i];
        end = -1;
        if (c == '\'') {
            end = string_end(p, i, n);
        } else if ((classes[c] & DIGIT) && (i == 0 || (!(classes[p[i - 1]] & WORD) && p[i - 1] != '.'))) {
            end = number_end(p, i, n, 0);
            if (end < 0) {
                i = digits_end(p, i, n); /* none of the run's digits can start a number */
                continue;
            }
        }
        if (end < 0) {
            i++;
            continue;
        }
        if (shaper_mark(&sh, i, end) < 0)
            return NULL;
        i = end;
    }
    return shaper_finish(&sh, arg);
}

/* shape_plain(sql) -> bytes | None: proxy.fingerprint.shape_plain_py (the cache's plain texts:
 * no '"$\-/ at all, so that their numbers are all their literals). */
static PyObject *
shape_plain(PyObject *module, PyObject *arg)
{
    return shape(arg, 1);
}

/* shape_numbers(sql) -> bytes | None: proxy.fingerprint.shape_numbers_py (the memo key of a text
 * whose only literals are numbers: a lone '-' or '/' is an operator, "--" and "/*" comments). */
static PyObject *
shape_numbers(PyObject *module, PyObject *arg)
{
    return shape(arg, 0);
}

static PyMethodDef methods[] = {
    {"answer", answer, METH_O,
     "answer(data) -> (data_rows, tag) | None: a whole, uneventful server answer, framed."},
    {"messages", (PyCFunction)(void (*)(void))messages, METH_FASTCALL,
     "messages(buf, max_message) -> (frames, stop, bad_length): the whole frontend messages of buf."},
    {"shape_plain", shape_plain, METH_O,
     "shape_plain(sql) -> bytes | None: a plain text's numbers made '?' (no '\"$\\-/ in it)."},
    {"shape_numbers", shape_numbers, METH_O,
     "shape_numbers(sql) -> bytes | None: text_shape's fast path (numbers made '?'; no quote, $, \\ or comment)."},
    {"shape_quoted", shape_quoted, METH_O,
     "shape_quoted(sql) -> bytes | None: '...' strings and numbers made '?' (no \", $, \\ or comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._speedups",
    "pgsidecar's compiled hot path (see proxy/frames.py for the Python twin).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_classes();
    return PyModule_Create(&module);
}
