// A C ABI over ExecuTorch's C++ Module, so that edgeship's runner can drive a .pte without torch.
//
// The executorch wheel's Python bindings (_C) link libtorch_python/libtorch_cpu and need the torch
// package imported first (~350 MB RSS before a model loads). Its C++ runtime (libexecutorch.so, the
// XNNPACK delegate and the CPU kernel libraries, all shipped in the same wheel) needs none of that.
// edgeship compiles this file once against the wheel's headers and libraries (see pte_lean.py) and
// calls it through ctypes. Every function returns 0 (or a count) on success and a negative value on
// failure, with the reason in es_last_error(). Nothing here throws across the C boundary.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace executorch::extension::threadpool {
// threadpool.h is not in the wheel's headers; these two members are all the runner needs
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

thread_local std::string last_error;

int fail(const std::string& what) {
  last_error = what;
  return -1;
}

int fail(const std::string& what, Error e) {
  char code[32];
  std::snprintf(code, sizeof(code), " (error 0x%x)", static_cast<unsigned>(e));
  return fail(what + code);
}

struct Freer {
  void operator()(void* p) const { std::free(p); }
};

struct MethodState {
  // Planned (activation) memory from calloc rather than Module's zero-filled std::vector: large callocs are
  // fresh zero pages the kernel maps on first touch, so a dynamic-shape method planned for its upper bound
  // (MiniLM: 512 tokens) keeps resident only what the inputs it is given reach.
  std::vector<std::unique_ptr<uint8_t, Freer>> arenas;
  std::vector<executorch::runtime::Span<uint8_t>> spans;
  std::unique_ptr<executorch::runtime::HierarchicalAllocator> planned;
  size_t planned_bytes = 0;
  std::vector<TensorPtr> tensors;  // keep the wrapped input buffers alive while the method may read them
  std::vector<EValue> inputs;
  std::vector<EValue> outputs;
};

// ---- edgeship's own LLM kernels ------------------------------------------------------------------------------
// The two ops an edgeship LLM .pte calls outside XNNPACK besides ExecuTorch's portable and quantized kernels:
// llama::update_cache.out and llama::custom_sdpa.out. The wheel ships them only in a library built against ATen
// (it maps torch's shared libraries, ~110 MB RSS), so a torch-free process registers these instead. Same
// semantics for what edgeship's exporter emits (fp32, contiguous [batch, seq, heads, dim] layouts, causal from
// start_pos, no mask, no dropout); anything else fails the op with InvalidArgument instead of computing something else.

using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

bool llm_check(KernelRuntimeContext& ctx, bool ok, const char* what) {
  if (!ok) {
    ET_LOG(Error, "edgeship LLM kernel: %s", what);
    ctx.fail(Error::InvalidArgument);
  }
  return ok;
}

// update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out) -> Tensor(b!)
// value [B, T, H, D] goes to cache[:, start_pos : start_pos + T]; out is a placeholder the op leaves alone.
void update_cache_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (!llm_check(ctx, stack.size() >= 4, "update_cache: expected 4 arguments")) return;
  const Tensor& value = stack[0]->toTensor();
  Tensor& cache = stack[1]->toTensor();
  const int64_t start = stack[2]->toInt();
  if (!llm_check(ctx, value.dim() == 4 && cache.dim() == 4, "update_cache: value and cache must be 4-D")) return;
  if (!llm_check(ctx, value.scalar_type() == cache.scalar_type(), "update_cache: dtypes differ")) return;
  if (!llm_check(ctx, executorch::runtime::tensor_is_contiguous(value) &&
                          executorch::runtime::tensor_is_contiguous(cache),
                 "update_cache: only contiguous tensors are supported")) return;
  const int64_t batch = value.size(0), seq = value.size(1), row = value.size(2) * value.size(3);
  if (!llm_check(ctx, cache.size(0) == batch && cache.size(2) * cache.size(3) == row,
                 "update_cache: value and cache shapes differ")) return;
  if (!llm_check(ctx, start >= 0 && start + seq <= cache.size(1), "update_cache: positions past the cache")) return;
  const size_t elem = value.element_size();
  const auto* src = static_cast<const uint8_t*>(value.const_data_ptr());
  auto* dst = static_cast<uint8_t*>(cache.mutable_data_ptr());
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(dst + ((b * cache.size(1) + start) * row) * elem, src + (b * seq * row) * elem,
                static_cast<size_t>(seq * row) * elem);
  }
}

// built for the CPU it runs on, picked at load time (the shim itself is compiled for the baseline ISA)
#if defined(__x86_64__) && defined(__GNUC__)
#define ES_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define ES_CLONES
#endif

inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};  // independent sums: the compiler vectorizes the loop for the clone's ISA
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int k = 0; k < 16; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float s = 0.0f;
  for (int k = 0; k < 16; ++k) s += acc[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Attention of every head of one query row in one sweep over the cache: each key and value row (all key/value
// heads, contiguous) is read once, in order, and serves every query head of its group (grouped-query attention).
// In a decode step the cache comes from memory (the weights have evicted it): a pass per key/value head took SmolLM2's
// 1-thread decode from 164 to 145 tok/s, this sweep matches the wheel's kernel (see the README).
ES_CLONES void attend_row(const float* q, float* out, int64_t heads, int64_t group, const float* kd, const float* vd,
                          int64_t kv_heads, int64_t keys, int64_t dim, float scale, float* score) {
  const int64_t stride = kv_heads * dim;
  for (int64_t j = 0; j < keys; ++j) {
    const float* kr = kd + j * stride;
    for (int64_t h = 0; h < heads; ++h) score[h * keys + j] = dot(q + h * dim, kr + (h / group) * dim, dim) * scale;
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = score + h * keys;
    float top = -INFINITY;
    for (int64_t j = 0; j < keys; ++j) top = std::max(top, sh[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < keys; ++j) {
      sh[j] = std::exp(sh[j] - top);
      total += sh[j];
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < keys; ++j) sh[j] *= inv;
  }
  std::fill(out, out + heads * dim, 0.0f);
  for (int64_t j = 0; j < keys; ++j) {
    const float* vr = vd + j * stride;
    for (int64_t h = 0; h < heads; ++h) {
      const float w = score[h * keys + j];
      const float* v = vr + (h / group) * dim;
      float* o = out + h * dim;
      for (int64_t d = 0; d < dim; ++d) o[d] += w * v[d];
    }
  }
}

// custom_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, Tensor? attn_mask, float dropout_p,
//                 bool is_causal, float? scale, *, Tensor(a!) out) -> Tensor(a!)
// query [B, T, H, D]; key/value the whole cache [B, S, Hkv, D] with H a multiple of Hkv (grouped-query heads);
// query row t (position start_pos + t) attends to keys 0 .. start_pos + t (causal) or 0 .. start_pos + T - 1.
void custom_sdpa_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (!llm_check(ctx, stack.size() >= 9, "custom_sdpa: expected 9 arguments")) return;
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t start = stack[3]->toInt();
  const bool causal = stack[6]->toBool();
  Tensor& out = stack[8]->toTensor();
  if (!llm_check(ctx, stack[4]->isNone(), "custom_sdpa: attention masks are not supported")) return;
  if (!llm_check(ctx, stack[5]->toDouble() == 0.0, "custom_sdpa: dropout is not supported")) return;
  if (!llm_check(ctx, q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "custom_sdpa: inputs must be 4-D")) return;
  const auto f32 = executorch::aten::ScalarType::Float;
  if (!llm_check(ctx, q.scalar_type() == f32 && k.scalar_type() == f32 && v.scalar_type() == f32 &&
                          out.scalar_type() == f32, "custom_sdpa: only float32 is supported")) return;
  if (!llm_check(ctx, executorch::runtime::tensor_is_contiguous(q) && executorch::runtime::tensor_is_contiguous(k) &&
                          executorch::runtime::tensor_is_contiguous(v),
                 "custom_sdpa: only contiguous tensors are supported")) return;
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t cap = k.size(1), kv_heads = k.size(2);
  if (!llm_check(ctx, k.size(0) == batch && k.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0 &&
                          v.size(0) == batch && v.size(1) == cap && v.size(2) == kv_heads && v.size(3) == dim,
                 "custom_sdpa: query, key and value shapes do not fit")) return;
  if (!llm_check(ctx, start >= 0 && start + seq <= cap, "custom_sdpa: positions past the cache")) return;
  if (!llm_check(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok,
                 "custom_sdpa: cannot resize the output")) return;
  const double scale = stack[7]->isNone() ? 1.0 / std::sqrt(static_cast<double>(dim)) : stack[7]->toDouble();
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  const int64_t group = heads / kv_heads;
  // a row per work item, all its heads in one sweep over the cache. A decode step is one row on one thread:
  // splitting its heads over two threads decoded no faster (SmolLM2; the cache reads dominate, see attend_row)
  executorch::extension::parallel_for(0, batch * seq, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> score(static_cast<size_t>(heads * (start + seq)));
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / seq, t = r % seq;
      const int64_t keys = causal ? start + t + 1 : start + seq;
      const int64_t at = (b * seq + t) * heads * dim;
      attend_row(qd + at, od + at, heads, group, kd + b * cap * kv_heads * dim, vd + b * cap * kv_heads * dim,
                 kv_heads, keys, dim, static_cast<float>(scale), score.data());
    }
  });
}

}  // namespace

struct es_handle {
  std::map<std::string, MethodState> methods;  // declared first: destroyed after the module that uses it
  std::unique_ptr<Module> module;
};

extern "C" {

const char* es_last_error() { return last_error.c_str(); }

es_handle* es_open(const char* path, int mmap) {
  try {
    auto h = std::make_unique<es_handle>();
    h->module = std::make_unique<Module>(path, mmap ? Module::LoadMode::Mmap : Module::LoadMode::File);
    Error e = h->module->load(executorch::runtime::Program::Verification::InternalConsistency);
    if (e != Error::Ok) {
      fail(std::string("cannot load program ") + path, e);
      return nullptr;
    }
    return h.release();
  } catch (const std::exception& ex) {
    fail(ex.what());
    return nullptr;
  }
}

void es_close(es_handle* h) { delete h; }

// Names separated by '\n' into buf; returns the length needed (without the terminator).
int es_method_names(es_handle* h, char* buf, size_t n) {
  auto names = h->module->method_names();
  if (!names.ok()) return fail("cannot list methods", names.error());
  std::string all;
  for (const auto& s : *names) all += (all.empty() ? "" : "\n") + s;
  if (buf && n) {
    std::snprintf(buf, n, "%s", all.c_str());
  }
  return static_cast<int>(all.size());
}

int es_load_method(es_handle* h, const char* method) {
  auto meta = h->module->method_meta(method);
  if (!meta.ok()) return fail(std::string("no method '") + method + "'", meta.error());
  MethodState& st = h->methods[method];
  for (size_t i = 0; i < meta->num_memory_planned_buffers(); ++i) {
    auto size = meta->memory_planned_buffer_size(i);
    if (!size.ok()) return fail("cannot size a planned buffer", size.error());
    auto* p = static_cast<uint8_t*>(std::calloc(static_cast<size_t>(*size) + 1, 1));
    if (!p) return fail("out of memory for the planned buffers");
    st.arenas.emplace_back(p);
    st.spans.emplace_back(p, static_cast<size_t>(*size));
    st.planned_bytes += static_cast<size_t>(*size);
  }
  st.planned = std::make_unique<executorch::runtime::HierarchicalAllocator>(
      executorch::runtime::Span<executorch::runtime::Span<uint8_t>>(st.spans.data(), st.spans.size()));
  Error e = h->module->load_method(method, st.planned.get());
  if (e != Error::Ok) {
    h->methods.erase(method);
    return fail(std::string("cannot load method '") + method + "'", e);
  }
  st.inputs.assign(meta->num_inputs(), EValue());
  st.tensors.assign(meta->num_inputs(), nullptr);
  return 0;
}

// Bytes of planned (activation) memory of a loaded method: the most its intermediate tensors can take.
int64_t es_planned_bytes(es_handle* h, const char* method) {
  auto it = h->methods.find(method);
  return it == h->methods.end() ? fail(std::string("method '") + method + "' is not loaded")
                                : static_cast<int64_t>(it->second.planned_bytes);
}

int es_num_inputs(es_handle* h, const char* method) {
  auto meta = h->module->method_meta(method);
  return meta.ok() ? static_cast<int>(meta->num_inputs()) : fail("no metadata for method", meta.error());
}

int es_num_outputs(es_handle* h, const char* method) {
  auto meta = h->module->method_meta(method);
  return meta.ok() ? static_cast<int>(meta->num_outputs()) : fail("no metadata for method", meta.error());
}

// dtype (c10 ScalarType code), rank and sizes (up to 16) of input `index`; -2 when it is not a tensor.
int es_input_meta(es_handle* h, const char* method, size_t index, int* dtype, int* ndim, int64_t* sizes) {
  auto meta = h->module->method_meta(method);
  if (!meta.ok()) return fail("no metadata for method", meta.error());
  auto info = meta->input_tensor_meta(index);
  if (!info.ok()) {
    fail("input is not a tensor", info.error());
    return -2;
  }
  auto s = info->sizes();
  *dtype = static_cast<int>(info->scalar_type());
  *ndim = static_cast<int>(s.size());
  for (size_t i = 0; i < s.size() && i < 16; ++i) sizes[i] = s[i];
  return 0;
}

// Wrap caller-owned memory (not copied: it must stay alive until the next es_set_input of this index).
int es_set_input(es_handle* h, const char* method, size_t index, int dtype, int ndim, const int64_t* sizes,
                 void* data) {
  auto it = h->methods.find(method);
  if (it == h->methods.end()) return fail(std::string("method '") + method + "' is not loaded");
  MethodState& st = it->second;
  if (index >= st.inputs.size()) return fail("input index out of range");
  std::vector<executorch::aten::SizesType> dims(sizes, sizes + ndim);
  try {
    st.tensors[index] = executorch::extension::make_tensor_ptr(std::move(dims), data, static_cast<ScalarType>(dtype));
  } catch (const std::exception& ex) {
    return fail(ex.what());
  }
  st.inputs[index] = EValue(*st.tensors[index]);
  return 0;
}

int es_execute(es_handle* h, const char* method) {
  auto it = h->methods.find(method);
  if (it == h->methods.end()) return fail(std::string("method '") + method + "' is not loaded");
  auto out = h->module->execute(method, it->second.inputs);
  if (!out.ok()) return fail(std::string("method '") + method + "' failed", out.error());
  it->second.outputs = std::move(*out);
  return static_cast<int>(it->second.outputs.size());
}

// Output `index` of the last es_execute. kind: 0 tensor (dtype, ndim, sizes, data, nbytes), 1 string
// (data, nbytes), 2 int, 3 double, 4 bool (value in *scalar), 5 none. The memory belongs to the method
// and is valid until its next execution.
int es_output(es_handle* h, const char* method, size_t index, int* kind, int* dtype, int* ndim, int64_t* sizes,
              const void** data, size_t* nbytes, double* scalar) {
  auto it = h->methods.find(method);
  if (it == h->methods.end() || index >= it->second.outputs.size()) return fail("no such output");
  const EValue& v = it->second.outputs[index];
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    *kind = 0;
    *dtype = static_cast<int>(t.scalar_type());
    *ndim = static_cast<int>(t.dim());
    for (ssize_t i = 0; i < t.dim() && i < 16; ++i) sizes[i] = t.size(i);
    *data = t.const_data_ptr();
    *nbytes = t.nbytes();
  } else if (v.isString()) {
    auto s = v.toString();
    *kind = 1;
    *data = s.data();
    *nbytes = s.size();
  } else if (v.isInt()) {
    *kind = 2;
    *scalar = static_cast<double>(v.toInt());
  } else if (v.isDouble()) {
    *kind = 3;
    *scalar = v.toDouble();
  } else if (v.isBool()) {
    *kind = 4;
    *scalar = v.toBool() ? 1.0 : 0.0;
  } else if (v.isNone()) {
    *kind = 5;
  } else {
    return fail("output of an unsupported type (a list or an optional)");
  }
  return 0;
}

int es_set_threads(unsigned n) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (!pool) return fail("no threadpool");
  return pool->_unsafe_reset_threadpool(n) ? 0 : fail("threadpool reset refused");
}

int es_get_threads() {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  return pool ? static_cast<int>(pool->get_thread_count()) : fail("no threadpool");
}

// Register edgeship's llama::update_cache.out and llama::custom_sdpa.out unless a kernel of that name is registered
// already (ExecuTorch panics on a second registration); returns how many this call registered.
int es_register_llm_kernels() {
  static const executorch::runtime::Kernel kernels[] = {
      executorch::runtime::Kernel("llama::update_cache.out", update_cache_boxed),
      executorch::runtime::Kernel("llama::custom_sdpa.out", custom_sdpa_boxed),
  };
  int added = 0;
  for (const auto& kernel : kernels) {
    bool known = false;  // (registry_has_op_function logs an error for every name it does not find)
    for (const auto& k : executorch::runtime::get_registered_kernels()) {
      known = known || std::strcmp(k.name_, kernel.name_) == 0;
    }
    if (known) continue;
    Error e = executorch::runtime::register_kernel(kernel);
    if (e != Error::Ok) return fail(std::string("cannot register ") + kernel.name_, e);
    ++added;
  }
  return added;
}

// Registered delegate names separated by '\n'; returns the length needed.
int es_backend_names(char* buf, size_t n) {
  std::string all;
  for (size_t i = 0; i < executorch::runtime::get_num_registered_backends(); ++i) {
    auto name = executorch::runtime::get_backend_name(i);
    if (name.ok()) all += (all.empty() ? "" : "\n") + std::string(*name);
  }
  if (buf && n) std::snprintf(buf, n, "%s", all.c_str());
  return static_cast<int>(all.size());
}

}  // extern "C"
