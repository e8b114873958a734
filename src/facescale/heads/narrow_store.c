/* Stochastic rounding and narrow storing of fp32 row blocks, one pass per block; and the
   narrow tables' SGD step fused with it.

   The same arithmetic as facescale/heads/storage.py's torch path (round_bf16_, round_fp16_,
   RowTable._quantize and _store) and as RowSGD.update_by_operation, operation for operation,
   so the two store the same bits: the noise of entry (i, j) is
   (row_noise[i] + column_noise[j]) mod 2**16, and row i of the block goes to table row rows[i]
   (or first + i when rows is NULL). Built with -ffp-contract=off: no multiply-add is fused
   that the torch path rounds twice. */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define NOISE_MASK 0xFFFFu
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define ROW static inline __attribute__((always_inline))

enum kind { FP32, BF16, FP16, INT8 }; /* as native.py's KINDS */

static inline uint32_t bits_of(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

static inline float float_of(uint32_t b) {
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

static inline int64_t table_row(const int64_t *rows, int64_t first, int64_t i) {
    return rows ? rows[i] : first + i;
}

/* bfloat16: add 16 random bits below the kept ones, truncate; a NaN stores as 0x7FC0. */
ROW void bf16_row(const float *src, int64_t dim, uint32_t r, const int32_t *column_noise,
                  uint16_t *dst) {
    for (int64_t j = 0; j < dim; j++) {
        uint32_t b = bits_of(src[j]) + ((r + (uint32_t)column_noise[j]) & NOISE_MASK);
        dst[j] = (b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : (uint16_t)(b >> 16);
    }
}

/* float16 to float32, exactly and without branches (so the widening loop is vectorised):
   normal numbers re-biased, subnormal ones as their integer mantissa times 2**-24. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = h & 0x7C00u;
    uint32_t magnitude = (uint32_t)(h & 0x7FFFu) << 13;
    float normal = float_of(magnitude + (112u << 23));
    float subnormal = (float)(h & 0x3FFu) * 5.9604644775390625e-08f;
    float special = float_of(magnitude | 0x7F800000u); /* infinity or NaN */
    float value = exponent == 0 ? subnormal : (exponent == 0x7C00u ? special : normal);
    return float_of(bits_of(value) | sign);
}

/* The float16 encoding of x, a value float16 holds exactly (or a NaN: sign | 0x7E00). */
static inline uint16_t half_of(float x) {
    uint32_t sign = (bits_of(x) >> 16) & 0x8000u;
    float magnitude = fabsf(x);
    uint32_t normal = (bits_of(magnitude) >> 13) - (112u << 10);
    uint32_t subnormal = (uint32_t)(int32_t)(magnitude * 16777216.0f);
    uint32_t half = magnitude < 6.103515625e-05f ? subnormal : normal;
    return (uint16_t)(sign | (magnitude != magnitude ? 0x7E00u : half));
}

/* half_of eight at a time with the F16C instruction (exact for these values, and the NaN
   0x7FC00000 | sign, which the rounding below makes of every NaN, gives sign | 0x7E00). */
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx,f16c"))) static void narrow_fp16_f16c(const float *src, int64_t dim,
                                                                  uint16_t *dst) {
    int64_t j = 0;
    for (; j + 8 <= dim; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), 0));
    for (; j < dim; j++) dst[j] = half_of(src[j]);
}

/* half_to_float eight at a time with the F16C instruction (exact, and four times faster). */
__attribute__((target("avx,f16c"))) static void widen_fp16_f16c(const uint16_t *src,
                                                                 int64_t dim, float *dst) {
    int64_t j = 0;
    for (; j + 8 <= dim; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
    for (; j < dim; j++) dst[j] = half_to_float(src[j]);
}
#define HAS_F16C __builtin_cpu_supports("f16c")
#else
#define HAS_F16C 0
#define narrow_fp16_f16c(src, dim, dst)
#define widen_fp16_f16c(src, dim, dst)
#endif

/* float16: 13 random bits below the kept ones of the magnitude, values below 2**-14 rounded
   in the lowest normal binade, saturation at 65504; stored exactly (a NaN as sign | 0x7E00). */
ROW void fp16_row(const float *src, int64_t dim, uint32_t r, const int32_t *column_noise,
                  uint16_t *dst) {
    const float tiny = 6.103515625e-05f, largest = 65504.0f;
    float rounded[dim];
    for (int64_t j = 0; j < dim; j++) {
        uint32_t sign = bits_of(src[j]) & 0x80000000u;
        float magnitude = fabsf(src[j]);
        float below = magnitude < tiny ? 1.0f : 0.0f;
        uint32_t noise = ((r + (uint32_t)column_noise[j]) & NOISE_MASK) >> 3;
        uint32_t b = (bits_of(magnitude + below * tiny) + noise) & ~0x1FFFu;
        float value = float_of(b) - below * tiny;
        value = value > largest ? largest : value;
        rounded[j] = float_of((value != value ? 0x7FC00000u : bits_of(value)) | sign);
    }
    if (HAS_F16C)
        narrow_fp16_f16c(rounded, dim, dst);
    else
        for (int64_t j = 0; j < dim; j++) dst[j] = half_of(rounded[j]);
}

/* 8 bits and a per-row scale: signed rows as round(x / scale) in [-127, 127] with
   scale = max|x| / 127, non-negative rows (levels 255) as their square root in [0, 255].
   x is overwritten with the codes, as the torch path does; returns the scale. */
ROW float int8_row(float *x, int64_t dim, uint32_t r, const int32_t *column_noise, void *dst,
                   int nonnegative) {
    const float levels = nonnegative ? 255.0f : 127.0f, lowest = nonnegative ? 0.0f : -127.0f;
    if (nonnegative)
        for (int64_t j = 0; j < dim; j++) x[j] = sqrtf(x[j] < 0.0f ? 0.0f : x[j]);
    /* the largest magnitude from the bits: for non-negative floats their order as integers is
       their order as numbers, and a NaN's bits exceed every number's */
    uint32_t largest = 0;
    for (int64_t j = 0; j < dim; j++) {
        uint32_t b = bits_of(x[j]) & 0x7FFFFFFFu;
        largest = b > largest ? b : largest;
    }
    float scale = largest > 0x7F800000u ? NAN : float_of(largest) / levels;
    float divisor = scale > 0.0f ? scale : 1.0f;
    for (int64_t j = 0; j < dim; j++) {
        float unit = (float)((r + (uint32_t)column_noise[j]) & NOISE_MASK) * 1.52587890625e-05f;
        float q = floorf(x[j] / divisor + unit);
        q = q < lowest ? lowest : (q > levels ? levels : q);
        x[j] = q == q ? q : 0.0f;
    }
    if (nonnegative)
        for (int64_t j = 0; j < dim; j++) ((uint8_t *)dst)[j] = (uint8_t)x[j];
    else
        for (int64_t j = 0; j < dim; j++) ((int8_t *)dst)[j] = (int8_t)x[j];
    return scale;
}

/* Row `row` of a table of `kind` set to x (overwritten for int8), rounded with noise r. */
ROW void store_row(int kind, float *x, int64_t dim, uint32_t r, const int32_t *column_noise,
                   void *table, float *scales, int64_t row) {
    if (kind == FP32) {
        float *dst = (float *)table + row * dim;
        if (dst != x) memcpy(dst, x, dim * sizeof *x);
    } else if (kind == BF16) {
        bf16_row(x, dim, r, column_noise, (uint16_t *)table + row * dim);
    } else if (kind == FP16) {
        fp16_row(x, dim, r, column_noise, (uint16_t *)table + row * dim);
    } else {
        scales[row] = int8_row(x, dim, r, column_noise, (int8_t *)table + row * dim, 0);
    }
}

CLONES void store_bf16(const float *block, int64_t count, int64_t dim, const int32_t *row_noise,
                       const int32_t *column_noise, uint16_t *table, const int64_t *rows,
                       int64_t first, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < count; i++)
        bf16_row(block + i * dim, dim, (uint32_t)row_noise[i], column_noise,
                 table + table_row(rows, first, i) * dim);
}

CLONES void store_fp16(const float *block, int64_t count, int64_t dim, const int32_t *row_noise,
                       const int32_t *column_noise, uint16_t *table, const int64_t *rows,
                       int64_t first, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < count; i++)
        fp16_row(block + i * dim, dim, (uint32_t)row_noise[i], column_noise,
                 table + table_row(rows, first, i) * dim);
}

/* The block is overwritten with the codes, as the torch path does. */
CLONES void store_int8(float *block, int64_t count, int64_t dim, const int32_t *row_noise,
                       const int32_t *column_noise, void *table, float *scales,
                       const int64_t *rows, int64_t first, int nonnegative, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (int64_t i = 0; i < count; i++) {
        int64_t row = table_row(rows, first, i);
        void *dst = (uint8_t *)table + row * dim;
        scales[row] = int8_row(block + i * dim, dim, (uint32_t)row_noise[i], column_noise, dst,
                               nonnegative);
    }
}

/* The gradient to a raw row w from the gradient g to its normalised row w / |w|:
   g_raw = g * inv - w * (inv^3 * (w . g)), inv = 1 / max(|w|, 1e-12), as lean.py's
   raw_center_grad_ does with torch (its sums in another order), into out. The two sums are
   vectorised as OpenMP's simd reduction allows (in turn where the compiler lacks OpenMP). */
ROW void raw_grad_row(const float *w, const float *g, int64_t dim, float *out) {
    float square = 0.0f, product = 0.0f;
#pragma omp simd reduction(+ : square, product)
    for (int64_t j = 0; j < dim; j++) {
        square += w[j] * w[j];
        product += w[j] * g[j];
    }
    float norm = sqrtf(square);
    float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
    float radial = product * (inv * inv * inv);
    for (int64_t j = 0; j < dim; j++) out[j] = g[j] * inv - w[j] * radial;
}

/* Row `row` of a centers table of `kind` in fp32: the row itself for FP32, else widened into
   wide. */
ROW float *load_row(int kind, void *table, int64_t row, int64_t dim, float *wide) {
    if (kind == FP32) return (float *)table + row * dim;
    const uint16_t *stored = (const uint16_t *)table + row * dim;
    if (kind == BF16)
        for (int64_t j = 0; j < dim; j++) wide[j] = float_of((uint32_t)stored[j] << 16);
    else if (HAS_F16C)
        widen_fp16_f16c(stored, dim, wide);
    else
        for (int64_t j = 0; j < dim; j++) wide[j] = half_to_float(stored[j]);
    return wide;
}

/* SGD with momentum (dampening 0) and L2 weight decay on a block of fp32 centers
   (overwritten; NULL: the rows are read from their table) and their momentum, read from and
   stored to its table of state_kind (FP32, BF16 or INT8; none when momentum_table is NULL),
   the centers stored to their table of center_kind. With `radial`, grad is the gradient to the normalised rows and each row's
   raw gradient is formed first (raw_grad_row), else grad is the raw gradient. Each operation
   is rounded once: step = g + w * decay; m = m * momentum + step (then step = m);
   w = w - step * lr. */
CLONES void sgd_store(float *block, const float *grad, int64_t count, int64_t dim,
                      const int32_t *row_noise, const int32_t *column_noise, const int64_t *rows,
                      int64_t first, int center_kind, void *centers, int state_kind,
                      void *momentum_table, float *momentum_scales, float lr, float momentum,
                      float decay, int radial, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float buffer[dim]; /* a row of momentum widened from 16 or 8 bits */
        float raw[dim];    /* a row's raw gradient, with `radial` */
        float wide[dim];   /* a row of centers widened from 16 bits, without a block */
#pragma omp for
        for (int64_t i = 0; i < count; i++) {
            int64_t row = table_row(rows, first, i);
            uint32_t r = (uint32_t)row_noise[i];
            float *w = block ? block + i * dim : load_row(center_kind, centers, row, dim, wide);
            const float *g = grad + i * dim;
            if (radial) {
                raw_grad_row(w, g, dim, raw);
                g = raw;
            }
            float *m = state_kind == FP32 && momentum_table
                           ? (float *)momentum_table + row * dim
                           : buffer;
            if (momentum_table && state_kind == BF16) {
                const uint16_t *stored = (const uint16_t *)momentum_table + row * dim;
                for (int64_t j = 0; j < dim; j++) m[j] = float_of((uint32_t)stored[j] << 16);
            } else if (momentum_table && state_kind == INT8) {
                const int8_t *stored = (const int8_t *)momentum_table + row * dim;
                float scale = momentum_scales[row];
                for (int64_t j = 0; j < dim; j++) m[j] = (float)stored[j] * scale;
            }
            if (momentum_table) {
                for (int64_t j = 0; j < dim; j++) {
                    float step = g[j] + w[j] * decay;
                    m[j] = m[j] * momentum + step;
                    w[j] = w[j] - m[j] * lr;
                }
            } else {
                for (int64_t j = 0; j < dim; j++) w[j] = w[j] - (g[j] + w[j] * decay) * lr;
            }
            store_row(center_kind, w, dim, r, column_noise, centers, NULL, row);
            if (momentum_table && state_kind != FP32)
                store_row(state_kind, m, dim, r, column_noise, momentum_table, momentum_scales,
                          row);
        }
    }
}
