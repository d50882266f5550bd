// Thin pybind11 bindings: check arguments, release the GIL, forward to C++.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <optional>
#include <random>
#include <cstring>
#include <limits>
#include <vector>
#include <stdexcept>
#include <string_view>
#include <thread>

#include "dispatch.h"
#include "model.h"
#include "quant_search.h"

namespace py = pybind11;
using namespace alpaca;

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

// A type id from Python, refused unless it is in the type traits table.
static GgmlType to_type(int t) { return checked_type(t); }

// The type traits table (ggml_types.h) for Python: one dict per type, in id order.
static py::list type_traits_list() {
  py::list out;
  for (const TypeTraits* t : all_type_traits()) {
    py::dict d;
    d["id"] = int(t->type);
    d["name"] = t->name;
    d["block_size"] = t->block_size;
    d["type_size"] = t->type_size;
    d["is_block"] = t->is_block;
    d["is_weight"] = t->is_weight;
    d["vec_dot_type"] = int(t->vec_dot_type);
    out.append(d);
  }
  return out;
}

constexpr int kMaxThreads = 1024;

static const KernelTable* table(const std::string& isa) {
  return isa.empty() ? active_kernels() : kernels_for(isa);
}

// Quantize (rows, cols) floats into GGML blocks, rows split over threads.
// method "reference": the type table's (GGML-exact) quantizer; "search": the error-minimising
// one (quant_search.h), weighting each column's squared error by `importance` (cols floats,
// or None for all ones). Non-finite inputs are refused with their row and column.
static ByteArray quantize(const FloatArray& x, int type, int n_threads, const std::string& isa,
                          const std::string& method, const std::optional<FloatArray>& importance) {
  if (x.ndim() != 2) throw std::invalid_argument("quantize: expected a 2-D float32 array");
  const GgmlType t = to_type(type);
  const TypeTraits& tt = type_traits(t);
  const int64_t rows = x.shape(0), cols = x.shape(1);
  if (cols % tt.block_size != 0)
    throw std::invalid_argument("quantize: row length " + std::to_string(cols) +
                                " is not a multiple of " + std::to_string(tt.block_size) + " (" +
                                tt.name + ")");
  if (n_threads < 1 || n_threads > kMaxThreads)
    throw std::invalid_argument("quantize: n_threads must be in [1, 1024]");
  const bool search = method == "search";
  if (!search && method != "reference")
    throw std::invalid_argument("quantize: method must be 'reference' or 'search', got '" +
                                method + "'");
  if (search && !has_search_quantizer(t))
    throw std::invalid_argument(std::string("quantize: no error-minimising quantizer for ") +
                                tt.name);
  if (importance && !search)
    throw std::invalid_argument("quantize: importance needs method='search'");
  const float* imp = nullptr;
  if (importance) {
    if (importance->ndim() != 1 || importance->shape(0) != cols)
      throw std::invalid_argument("quantize: importance must be a 1-D array of " +
                                  std::to_string(cols) + " floats (one per column)");
    imp = importance->data();
    for (int64_t i = 0; i < cols; i++)
      if (!(imp[i] >= 0) || !std::isfinite(imp[i]))
        throw std::invalid_argument("quantize: importance[" + std::to_string(i) + "] = " +
                                    std::to_string(imp[i]) + ", expected finite and >= 0");
  }
  if (search) {
    const float* p = x.data();
    for (int64_t i = 0; i < rows * cols; i++)
      if (!std::isfinite(p[i]))
        throw std::invalid_argument("quantize: non-finite value " + std::to_string(p[i]) +
                                    " at row " + std::to_string(i / cols) + ", column " +
                                    std::to_string(i % cols));
  }
  const FromFloatFn from_float = table(isa)->of(t, Need::FromFloat).from_float;
  const size_t rb = row_bytes(t, cols);
  ByteArray out({rows, int64_t(rb)});
  const float* src = x.data();
  uint8_t* dst = out.mutable_data();
  auto work = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      if (search) quantize_row_search(t, src + r * cols, dst + r * rb, cols, imp);
      else from_float(src + r * cols, dst + r * rb, cols);
    }
  };
  {
    py::gil_scoped_release release;
    const int nt = int(std::max<int64_t>(1, std::min<int64_t>(n_threads, rows)));
    std::vector<std::thread> threads;
    for (int i = 1; i < nt; i++) threads.emplace_back(work, rows * i / nt, rows * (i + 1) / nt);
    work(0, rows / nt);
    for (auto& th : threads) th.join();
  }
  return out;
}

static FloatArray dequantize(const ByteArray& x, int type, int64_t cols, const std::string& isa) {
  const GgmlType t = to_type(type);
  const TypeTraits& tt = type_traits(t);
  if (x.ndim() != 2) throw std::invalid_argument("dequantize: expected a 2-D uint8 array");
  if (cols % tt.block_size != 0)
    throw std::invalid_argument("dequantize: row length must be a multiple of " +
                                std::to_string(tt.block_size) + " (" + tt.name + ")");
  const size_t rb = row_bytes(t, cols);
  if (size_t(x.shape(1)) != rb)
    throw std::invalid_argument("dequantize: rows of " + std::to_string(x.shape(1)) +
                                " bytes, expected " + std::to_string(rb));
  const ToFloatFn to_float = table(isa)->of(t, Need::ToFloat).to_float;
  const int64_t rows = x.shape(0);
  FloatArray out({rows, cols});
  for (int64_t r = 0; r < rows; r++) to_float(x.data() + r * rb, out.mutable_data() + r * cols, cols);
  return out;
}

// out[t, r] = dot(w row r, act row t) with the ISA's GEMM kernel; w (GGML rows, packed here
// for the ISA as the model does at load) and act already in the pairing formats.
// What Model::matmuls makes next to the activations for kernels that read it (act_block_info
// of every token's row); empty otherwise.
static std::vector<ActBlockInfo> act_infos(const TypeKernels& tk, GgmlType at, const uint8_t* act,
                                           int64_t n_tok, size_t act_stride, int64_t cols) {
  std::vector<ActBlockInfo> info;
  if (!tk.uses_act_info) return info;
  info.resize(size_t(n_tok * (cols / QK)));
  for (int64_t i = 0; i < n_tok; i++)
    act_block_info(at, act + i * act_stride, cols / QK, info.data() + i * (cols / QK));
  return info;
}

static FloatArray gemm(int wtype, const ByteArray& w, const py::array& act, int64_t cols,
                       const std::string& isa) {
  const GgmlType t = to_type(wtype);
  if (w.ndim() != 2 || act.ndim() != 2) throw std::invalid_argument("gemm: expected 2-D arrays");
  const TypeTraits& tt = type_traits(t);
  if (cols % tt.block_size != 0)
    throw std::invalid_argument("gemm: cols must be a multiple of " + std::to_string(tt.block_size) +
                                " (" + tt.name + ")");
  const KernelTable* k = table(isa);
  const TypeKernels& tk = k->of(t, Need::Gemm);
  const GgmlType at = tt.vec_dot_type;
  if (size_t(w.shape(1)) != row_bytes(t, cols) ||
      size_t(act.shape(1) * act.itemsize()) != row_bytes(at, cols) ||
      !(act.flags() & py::array::c_style))
    throw std::invalid_argument("gemm: row sizes do not match the types and cols");
  const int64_t n_rows = w.shape(0), n_tok = act.shape(0);
  FloatArray out({n_tok, n_rows});
  // NaN first: an element a kernel forgot to write fails the tests instead of showing whatever
  // the allocator left there (a freed array of the same size can hold the expected values).
  std::fill(out.mutable_data(), out.mutable_data() + n_tok * n_rows, std::numeric_limits<float>::quiet_NaN());
  std::vector<uint8_t> packed(k->packed_bytes(t, n_rows, cols));
  k->pack(t, w.data(), n_rows, cols, packed.data());
  const size_t act_stride = size_t(act.shape(1) * act.itemsize());
  const std::vector<ActBlockInfo> info =
      act_infos(tk, at, static_cast<const uint8_t*>(act.data()), n_tok, act_stride, cols);
  tk.gemm(cols, packed.data(), w.shape(1), n_rows, act.data(), act_stride,
          info.empty() ? nullptr : info.data(), n_tok, out.mutable_data(), n_rows);
  return out;
}

static FloatArray rmsnorm(const FloatArray& x, const FloatArray& w, float eps, const std::string& isa) {
  if (x.ndim() != 1 || w.ndim() != 1 || x.shape(0) != w.shape(0))
    throw std::invalid_argument("rmsnorm: x and weight must be 1-D of equal length");
  FloatArray y(x.shape(0));
  table(isa)->rmsnorm(x.data(), w.data(), y.mutable_data(), x.shape(0), eps);
  return y;
}

static FloatArray swiglu(const FloatArray& g, const FloatArray& u, const std::string& isa) {
  if (g.ndim() != 1 || u.ndim() != 1 || g.shape(0) != u.shape(0))
    throw std::invalid_argument("swiglu: gate and up must be 1-D of equal length");
  FloatArray y(g.shape(0));
  table(isa)->swiglu(g.data(), u.data(), y.mutable_data(), g.shape(0));
  return y;
}

// Returns (softmax(scale * x), log(sum(exp(scale * x)))).
static py::tuple softmax(const FloatArray& x, float scale, const std::string& isa) {
  if (x.ndim() != 1 || x.shape(0) < 1) throw std::invalid_argument("softmax: x must be 1-D, not empty");
  FloatArray y(x.shape(0));
  std::memcpy(y.mutable_data(), x.data(), x.shape(0) * 4);
  const float lse = table(isa)->softmax(y.mutable_data(), x.shape(0), scale);
  return py::make_tuple(y, lse);
}

static FloatArray axpy_f16(float a, const py::array_t<uint16_t, py::array::c_style>& x,
                           const FloatArray& y, const std::string& isa) {
  if (x.ndim() != 1 || y.ndim() != 1 || x.shape(0) != y.shape(0))
    throw std::invalid_argument("axpy_f16: x and y must be 1-D of equal length");
  FloatArray out(y.shape(0));
  std::memcpy(out.mutable_data(), y.data(), y.shape(0) * 4);
  table(isa)->axpy_f16(y.shape(0), a, x.data(), out.mutable_data());
  return out;
}

// out[q] = sum_p w[q, p] * v[p] with the ISA's mix_rows; v as float16 bits (uint16) or float32.
static FloatArray mix_rows(const py::array& v, const FloatArray& w, const std::string& isa) {
  if (v.ndim() != 2 || w.ndim() != 2 || w.shape(1) != v.shape(0) ||
      !(v.flags() & py::array::c_style))
    throw std::invalid_argument("mix_rows: need v (n_pos, n) and w (n_q, n_pos), C-contiguous");
  GgmlType vt;
  if (py::isinstance<py::array_t<uint16_t>>(v)) {
    vt = GgmlType::F16;
  } else if (py::isinstance<py::array_t<float>>(v)) {
    vt = GgmlType::F32;
  } else {
    throw std::invalid_argument("mix_rows: v must be uint16 (float16 bits) or float32");
  }
  const int64_t n_pos = v.shape(0), n = v.shape(1), n_q = w.shape(0);
  FloatArray out({n_q, n});
  table(isa)->mix_rows(vt, n, v.data(), size_t(n) * v.itemsize(), n_pos, w.data(), n_pos, n_q,
                       out.mutable_data(), n);
  return out;
}

// Memory read bandwidth in GB/s: the best of `reps` passes of n_threads threads each reading
// its slice of an nbytes buffer (much larger than the caches) with the ISA's widest loads.
static double read_bandwidth(int64_t nbytes, int n_threads, int reps, const std::string& isa) {
  if (nbytes < (1 << 20) || n_threads < 1 || n_threads > kMaxThreads || reps < 1)
    throw std::invalid_argument("read_bandwidth: need nbytes >= 1 MiB, 1 <= n_threads <= 1024, "
                                "reps >= 1");
  const KernelTable* k = table(isa);
  py::gil_scoped_release release;
  const int64_t slice = nbytes / n_threads / 4096 * 4096;
  Buffer buf(size_t(slice) * n_threads);
  std::memset(buf.data(), 1, buf.size());  // fault every page in before timing
  std::vector<uint64_t> sink(n_threads);
  double best = 0.0;
  for (int rep = 0; rep < reps; rep++) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> threads;
    for (int i = 0; i < n_threads; i++)
      threads.emplace_back([&, i] { sink[i] = k->read_bytes(buf.data() + i * slice, slice); });
    for (auto& th : threads) th.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(slice) * n_threads / s / 1e9);
  }
  return best;
}

// One thread's GEMM read rate in GB/s of weight bytes: the best of `reps` passes of n_tok
// tokens over enough rows x cols matrices of wtype to hold total_bytes (larger than the caches
// for memory; small for the kernel alone), packed as the table runs them. Weights and
// activations are quantized from seeded normal floats by the scalar (reference) quantizers.
static double gemm_read_rate(int wtype, int64_t rows, int64_t cols, int64_t n_tok,
                             int64_t total_bytes, int reps, const std::string& isa) {
  const GgmlType t = to_type(wtype);
  const TypeTraits& tt = type_traits(t);
  const auto refuse = [](const std::string& what) {
    throw std::invalid_argument("gemm_read_rate: " + what);
  };
  if (rows < 16 || rows % 16 != 0)
    refuse("rows " + std::to_string(rows) + " is not a positive multiple of 16 (the panel split)");
  if (cols < 1 || cols % tt.block_size != 0)
    refuse("cols " + std::to_string(cols) + " is not a positive multiple of " +
           std::to_string(tt.block_size) + " (" + tt.name + ")");
  if (n_tok < 1 || n_tok > 512) refuse("n_tok " + std::to_string(n_tok) + " is not in 1..512");
  if (total_bytes < 1 || reps < 1) refuse("total_bytes and reps must be >= 1");
  const KernelTable* k = table(isa);
  const KernelTable* ref = kernels_for("scalar");
  const GgmlType at = tt.vec_dot_type;
  const TypeKernels& tk = k->of(t, Need::Gemm);
  const FromFloatFn quant_w = ref->of(t, Need::FromFloat).from_float;
  const FromFloatFn quant_a = ref->of(at, Need::FromFloat).from_float;
  py::gil_scoped_release release;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(cols));
  const size_t w_row = row_bytes(t, cols), a_row = row_bytes(at, cols);
  std::vector<uint8_t> q(size_t(rows) * w_row);
  for (int64_t r = 0; r < rows; r++) {
    for (float& v : x) v = normal(rng);
    quant_w(x.data(), q.data() + size_t(r) * w_row, cols);
  }
  const size_t packed_bytes = k->packed_bytes(t, rows, cols);
  const int64_t n_mat = std::max<int64_t>(1, (total_bytes + int64_t(q.size()) - 1) / int64_t(q.size()));
  std::vector<Buffer> packed;
  for (int64_t m = 0; m < n_mat; m++) {
    packed.emplace_back(packed_bytes);
    k->pack(t, q.data(), rows, cols, packed.back().data());
  }
  std::vector<uint8_t> act(size_t(n_tok) * a_row);
  for (int64_t i = 0; i < n_tok; i++) {
    for (float& v : x) v = normal(rng);
    quant_a(x.data(), act.data() + size_t(i) * a_row, cols);
  }
  const std::vector<ActBlockInfo> info = act_infos(tk, at, act.data(), n_tok, a_row, cols);
  std::vector<float> out(size_t(n_tok * rows));
  double best = 0.0;
  for (int rep = 0; rep < reps; rep++) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t m = 0; m < n_mat; m++)
      tk.gemm(cols, packed[m].data(), w_row, rows, act.data(), a_row,
              info.empty() ? nullptr : info.data(), n_tok, out.data(), rows);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(q.size()) * double(n_mat) / s / 1e9);
  }
  return best;
}

class PyModel {
 public:
  PyModel(const py::dict& hparams, const py::dict& tensors, int64_t n_ctx, int n_threads,
          bool kv_f16, int64_t n_slots) {
    HParams hp;
    hp.n_vocab = hparams["n_vocab"].cast<int64_t>();
    hp.dim = hparams["dim"].cast<int64_t>();
    hp.n_layers = hparams["n_layers"].cast<int64_t>();
    hp.n_heads = hparams["n_heads"].cast<int64_t>();
    hp.n_kv_heads = hparams["n_kv_heads"].cast<int64_t>();
    hp.head_dim = hparams["head_dim"].cast<int64_t>();
    hp.ffn_dim = hparams["ffn_dim"].cast<int64_t>();
    hp.n_rot = hparams["n_rot"].cast<int64_t>();
    hp.rope_base = hparams["rope_base"].cast<float>();
    hp.rms_eps = hparams["rms_eps"].cast<float>();
    if (hp.n_kv_heads < 1 || hp.n_heads % hp.n_kv_heads != 0 || hp.n_rot % 2 != 0 ||
        hp.n_rot > hp.head_dim || hp.head_dim > 1024)
      throw std::invalid_argument("Model: inconsistent hyper-parameters");
    std::map<std::string, TensorIn> tin;
    std::vector<py::buffer_info> keep;  // buffers stay valid until the weights are copied
    for (auto item : tensors) {
      const auto name = item.first.cast<std::string>();
      auto tup = item.second.cast<py::tuple>();
      const int type = tup[0].cast<int>();
      const int64_t rows = tup[1].cast<int64_t>(), cols = tup[2].cast<int64_t>();
      py::buffer buf = tup[3].cast<py::buffer>();
      keep.push_back(buf.request());
      const auto& info = keep.back();
      tin[name] = TensorIn{to_type(type), rows, cols, static_cast<const uint8_t*>(info.ptr),
                           size_t(info.size * info.itemsize)};
    }
    const KernelTable* kernels = active_kernels();
    py::gil_scoped_release release;
    model_ = std::make_unique<Model>(hp, tin, n_ctx, n_threads, kv_f16, kernels, n_slots);
  }

  FloatArray forward(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& tokens,
                     int64_t start_pos, bool all_logits) {
    if (tokens.ndim() != 1) throw std::invalid_argument("forward: tokens must be 1-D");
    const int64_t n = tokens.shape(0), V = model_->hparams().n_vocab;
    FloatArray out = all_logits ? FloatArray({n, V}) : FloatArray(V);
    float* dst = out.mutable_data();
    const int32_t* src = tokens.data();
    {
      py::gil_scoped_release release;
      model_->forward(src, n, start_pos, all_logits, dst);
    }
    return out;
  }

  // (n_out, n_vocab) logits, or (n_out, dim) hidden states, of the tokens with want set.
  FloatArray forward_seqs(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& tokens,
                          const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& seq,
                          const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& pos,
                          const py::array_t<uint8_t, py::array::c_style | py::array::forcecast>& want,
                          bool hidden) {
    const int64_t n = tokens.shape(0);
    if (tokens.ndim() != 1 || seq.ndim() != 1 || pos.ndim() != 1 || want.ndim() != 1 ||
        seq.shape(0) != n || pos.shape(0) != n || want.shape(0) != n)
      throw std::invalid_argument("forward_seqs: tokens, seq_ids, positions and want must be 1-D "
                                  "of one length");
    int64_t n_out = 0;
    for (int64_t i = 0; i < n; i++) n_out += want.data()[i] != 0;
    const int64_t width = hidden ? model_->hparams().dim : model_->hparams().n_vocab;
    FloatArray out({n_out, width});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      model_->forward_seqs(tokens.data(), seq.data(), pos.data(), n, want.data(), hidden, dst);
    }
    return out;
  }

  py::bytes save_kv(int64_t n_pos) {
    std::vector<uint8_t> v;
    {
      py::gil_scoped_release release;
      v = model_->save_kv(n_pos);
    }
    return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
  }

  void load_kv(const py::bytes& data, int64_t n_pos) {
    std::string_view sv = data;  // the bytes object stays alive: `data` holds a reference
    py::gil_scoped_release release;
    model_->load_kv(reinterpret_cast<const uint8_t*>(sv.data()), sv.size(), n_pos);
  }

  Model& model() { return *model_; }

 private:
  std::unique_ptr<Model> model_;
};

PYBIND11_MODULE(_core, m) {
  m.doc() = "alpaca_cpu native core: quantized kernels and the LLaMA forward pass";
  m.def("available_isas", &available_isas, "ISAs this CPU and build support, lowest first");
  m.def("set_active_isa", &set_active_isa, py::arg("name"),
        "Use this ISA's kernels for models created from now on");
  m.def("active_isa", [] { return std::string(active_kernels()->name); });

  m.def("type_traits", &type_traits_list,
        "The GGML types the engine knows, one dict per type: id, name, block_size, type_size, "
        "is_block, is_weight, vec_dot_type");
  m.def("quantize", &quantize, py::arg("x"), py::arg("type"), py::arg("n_threads") = 1,
        py::arg("isa") = "", py::arg("method") = "reference", py::arg("importance") = py::none());
  m.def("has_search_quantizer", [](int type) { return has_search_quantizer(to_type(type)); },
        py::arg("type"), "Whether quantize(method='search') handles this type");
  m.def("dequantize", &dequantize, py::arg("data"), py::arg("type"), py::arg("cols"),
        py::arg("isa") = "");
  m.def("gemm", &gemm, py::arg("wtype"), py::arg("w"), py::arg("act"), py::arg("cols"),
        py::arg("isa") = "");
  m.def("rmsnorm", &rmsnorm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("isa") = "");
  m.def("swiglu", &swiglu, py::arg("gate"), py::arg("up"), py::arg("isa") = "");
  m.def("read_bandwidth", &read_bandwidth, py::arg("nbytes"), py::arg("n_threads"),
        py::arg("reps") = 5, py::arg("isa") = "");
  m.def("gemm_read_rate", &gemm_read_rate, py::arg("wtype"), py::arg("rows"), py::arg("cols"),
        py::arg("n_tok"), py::arg("total_bytes"), py::arg("reps") = 15, py::arg("isa") = "",
        "One thread's GEMM read rate (GB/s of weight bytes) over total_bytes of packed matrices");
  m.def("axpy_f16", &axpy_f16, py::arg("a"), py::arg("x"), py::arg("y"), py::arg("isa") = "");
  m.def("softmax", &softmax, py::arg("x"), py::arg("scale"), py::arg("isa") = "");
  m.def("mix_rows", &mix_rows, py::arg("v"), py::arg("w"), py::arg("isa") = "");

  py::class_<PyModel>(m, "Model")
      .def(py::init<const py::dict&, const py::dict&, int64_t, int, bool, int64_t>(),
           py::arg("hparams"), py::arg("tensors"), py::arg("n_ctx"), py::arg("n_threads"),
           py::arg("kv_f16") = true, py::arg("n_slots") = 1)
      .def("forward_seqs", &PyModel::forward_seqs, py::arg("tokens"), py::arg("seq_ids"),
           py::arg("positions"), py::arg("want"), py::arg("hidden"))
      .def("slot_length", [](PyModel& p, int64_t s) { return p.model().slot_length(s); },
           py::arg("slot"))
      .def("rewind_slot", [](PyModel& p, int64_t s, int64_t n_pos) {
             py::gil_scoped_release release;
             p.model().rewind_slot(s, n_pos);
           }, py::arg("slot"), py::arg("n_pos"))
      .def_property_readonly("n_slots", [](PyModel& p) { return p.model().n_slots(); })
      .def("forward", &PyModel::forward, py::arg("tokens"), py::arg("start_pos"),
           py::arg("all_logits"))
      .def("save_kv", &PyModel::save_kv, py::arg("n_pos"))
      .def("load_kv", &PyModel::load_kv, py::arg("data"), py::arg("n_pos"))
      .def_property_readonly("n_ctx", [](PyModel& p) { return p.model().n_ctx(); })
      .def_property_readonly("n_threads", [](PyModel& p) { return p.model().n_threads(); })
      .def_property_readonly("isa", [](PyModel& p) { return std::string(p.model().isa()); })
      .def_property_readonly("kv_cache_bytes", [](PyModel& p) { return p.model().kv_cache_bytes(); })
      .def_property_readonly("weight_bytes", [](PyModel& p) { return p.model().weight_bytes(); });
}
