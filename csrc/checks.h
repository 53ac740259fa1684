// Argument checks shared by the bindings: a bad argument raises ValueError (std::invalid_argument)
// naming it, before any kernel sees a pointer.
#pragma once
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace tritlm {
namespace checks {

namespace nb = nanobind;

constexpr int64_t kAny = -1;
using Input = nb::ndarray<nb::ro>;
using Output = nb::ndarray<>;  // nanobind refuses read-only buffers for these

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }
inline std::string str(int64_t v) { return std::to_string(v); }

inline const nb::dlpack::dtype kF32 = nb::dtype<float>(), kI32 = nb::dtype<int32_t>(), kU8 = nb::dtype<uint8_t>();
inline const nb::dlpack::dtype kF16{uint8_t(nb::dlpack::dtype_code::Float), 16, 1};

inline std::string dtype_name(nb::dlpack::dtype t) {
  const char* kind = t.code == uint8_t(nb::dlpack::dtype_code::Int)     ? "int"
                     : t.code == uint8_t(nb::dlpack::dtype_code::UInt)  ? "uint"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Float) ? "float"
                     : t.code == uint8_t(nb::dlpack::dtype_code::Bfloat) ? "bfloat"
                                                                         : "other";
  return kind + str(t.bits);
}

inline std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + (dims[i] == kAny ? "*" : str(dims[i]));
  return s + (dims.size() == 1 ? ",)" : ")");
}

template <class Array> std::vector<int64_t> dims_of(const Array& a) {
  std::vector<int64_t> d;
  for (size_t i = 0; i < a.ndim(); ++i) d.push_back(int64_t(a.shape(i)));
  return d;
}

template <class Array> Array array_arg(nb::handle h, const char* name, const char* what) {
  Array a;
  if (!nb::try_cast(h, a, false)) fail(std::string(name) + ": expected " + what);
  return a;
}
inline Input input(nb::handle h, const char* name) { return array_arg<Input>(h, name, "an array"); }
inline Output output(nb::handle h, const char* name) { return array_arg<Output>(h, name, "a writable array"); }

// Checks device, dtype (one of `dtypes`), rank, the dimensions given (kAny matches any) and
// C-contiguity; returns the data pointer.
template <class Array>
void* check(const Array& a, const char* name, std::vector<nb::dlpack::dtype> dtypes, std::vector<int64_t> shape) {
  const std::string n = name;
  if (a.device_type() != nb::device::cpu::value) fail(n + ": must be in CPU memory");
  bool dtype_ok = false;
  std::string want;
  for (const auto& t : dtypes) {
    dtype_ok |= a.dtype() == t;
    want += (want.empty() ? "" : " or ") + dtype_name(t);
  }
  if (!dtype_ok) fail(n + ": expected " + want + ", got " + dtype_name(a.dtype()));
  bool ok = a.ndim() == shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] == kAny || int64_t(a.shape(i)) == shape[i];
  if (!ok) fail(n + ": expected shape " + dims_str(shape) + ", got " + dims_str(dims_of(a)));
  int64_t stride = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != stride) fail(n + ": must be C-contiguous");
    stride *= int64_t(a.shape(i));
  }
  return const_cast<void*>(static_cast<const void*>(a.data()));
}

template <class T>
nb::ndarray<nb::numpy, T> new_array(std::vector<size_t> shape) {
  size_t n = 1;
  for (size_t d : shape) n *= d;
  T* data = new T[n ? n : 1];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T>(data, shape.size(), shape.data(), owner);
}

inline void check_threads(int n_threads) {
  if (n_threads < 1 || n_threads > 1024) fail("n_threads must be between 1 and 1024, got " + str(n_threads));
}

}  // namespace checks
}  // namespace tritlm
