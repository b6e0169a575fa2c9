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
