// GPU launcher of fused block-sparse attention: the CUDA driver API opened
// with dlopen, the ahead-of-time compiled Triton kernels loaded with
// cuLibraryLoadData (context-independent) at their first use, and launches
// whose arguments are checked against each kernel's parameter list.
#include "custom_ops/cc/kernels/block_sparse_attention_gpu.h"

#include <dlfcn.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "custom_ops/cc/kernels/compiled_kernels.h"

namespace st_keras {
namespace gpu {
namespace {

// The few driver API types and constants used here (cuda.h is not needed).
using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUlibrary = struct CUlib_st*;
using CUkernel = struct CUkern_st*;
using CUfunction = struct CUfunc_st*;
using CUdeviceptr = unsigned long long;  // NOLINT: the driver's type
constexpr CUresult kSuccess = 0;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kAttrMaxSharedPerBlockOptin = 97;
constexpr int kFuncAttrMaxDynamicSharedBytes = 8;
constexpr int kDefaultSharedBytes = 48 * 1024;

// Kernel names, as in custom_ops/triton/kernels.py.
constexpr char kForwardKernel[] = "bsa_forward";
constexpr char kDeltaKernel[] = "bsa_backward_delta";
constexpr char kDkDvKernel[] = "bsa_backward_dkdv";
constexpr char kDqKernel[] = "bsa_backward_dq";

struct Driver {
  std::string error;  // why the driver cannot be used, or ""
  CUresult (*Init)(unsigned);
  CUresult (*GetErrorString)(CUresult, const char**);
  CUresult (*StreamGetCtx)(CUstream, CUcontext*);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext*);
  CUresult (*CtxGetDevice)(CUdevice*);
  CUresult (*DeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*LibraryLoadData)(CUlibrary*, const void*, void*, void**,
                              unsigned, void*, void**, unsigned);
  CUresult (*LibraryGetKernel)(CUkernel*, CUlibrary, const char*);
  CUresult (*KernelGetFunction)(CUfunction*, CUkernel);
  CUresult (*KernelSetAttribute)(int, int, CUkernel, CUdevice);
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned,
                           unsigned, unsigned, unsigned, unsigned, CUstream,
                           void**, void**);
  CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
};

template <typename Fn>
bool Bind(void* lib, const char* name, Fn* fn, std::string* error) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*fn == nullptr && error->empty()) {
    *error = std::string("the CUDA driver has no ") + name +
             " (a driver for CUDA 12.0 or newer is needed)";
  }
  return *fn != nullptr;
}

const Driver& GetDriver() {
  static const Driver* driver = [] {
    auto* d = new Driver();
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      d->error = std::string("no CUDA driver: cannot open libcuda.so.1 (") +
                 (why ? why : "unknown error") + ")";
      return d;
    }
    std::string& e = d->error;
    Bind(lib, "cuInit", &d->Init, &e);
    Bind(lib, "cuGetErrorString", &d->GetErrorString, &e);
    Bind(lib, "cuStreamGetCtx", &d->StreamGetCtx, &e);
    Bind(lib, "cuCtxPushCurrent_v2", &d->CtxPushCurrent, &e);
    Bind(lib, "cuCtxPopCurrent_v2", &d->CtxPopCurrent, &e);
    Bind(lib, "cuCtxGetDevice", &d->CtxGetDevice, &e);
    Bind(lib, "cuDeviceGetAttribute", &d->DeviceGetAttribute, &e);
    Bind(lib, "cuLibraryLoadData", &d->LibraryLoadData, &e);
    Bind(lib, "cuLibraryGetKernel", &d->LibraryGetKernel, &e);
    Bind(lib, "cuKernelGetFunction", &d->KernelGetFunction, &e);
    Bind(lib, "cuKernelSetAttribute", &d->KernelSetAttribute, &e);
    Bind(lib, "cuLaunchKernel", &d->LaunchKernel, &e);
    Bind(lib, "cuMemcpyHtoDAsync_v2", &d->MemcpyHtoDAsync, &e);
    if (e.empty()) {
      const CUresult status = d->Init(0);
      if (status != kSuccess) {
        e = "cuInit failed with CUDA error " + std::to_string(status);
      }
    }
    return d;
  }();
  return *driver;
}

std::string CudaError(const Driver& d, CUresult status, const char* what) {
  const char* text = nullptr;
  d.GetErrorString(status, &text);
  return std::string(what) + " failed: " + (text ? text : "unknown error") +
         " (CUDA error " + std::to_string(status) + ")";
}

#define ST_RETURN_IF_CUDA(d, call, what)         \
  do {                                           \
    const CUresult status_ = (call);             \
    if (status_ != kSuccess) {                   \
      return CudaError((d), status_, (what));    \
    }                                            \
  } while (0)

// Makes the context of `stream` current for its lifetime.
class ScopedStreamContext {
 public:
  ScopedStreamContext(const Driver& d, CUstream stream) : d_(d) {
    CUcontext ctx = nullptr;
    status_ = d_.StreamGetCtx(stream, &ctx);
    if (status_ == kSuccess) {
      status_ = d_.CtxPushCurrent(ctx);
      pushed_ = status_ == kSuccess;
    }
  }
  ~ScopedStreamContext() {
    if (pushed_) {
      CUcontext ignored = nullptr;
      d_.CtxPopCurrent(&ignored);
    }
  }
  CUresult status() const { return status_; }

 private:
  const Driver& d_;
  CUresult status_ = kSuccess;
  bool pushed_ = false;
};

// The arguments of one launch, in the kernel's parameter order, and their
// PTX types ("u64,f32,u32,..."). The two null pointers Triton appends
// (global and profile scratch) are part of it.
class KernelArgs {
 public:
  KernelArgs& Pointer(const void* p) {
    return Add(reinterpret_cast<uint64_t>(p), "u64");
  }
  KernelArgs& Float(float x) {
    uint64_t bits = 0;
    std::memcpy(&bits, &x, sizeof(x));
    return Add(bits, "f32");
  }
  KernelArgs& Int(int64_t x) {
    return Add(static_cast<uint32_t>(static_cast<int32_t>(x)), "u32");
  }
  KernelArgs& Scratch() { return Pointer(nullptr).Pointer(nullptr); }

  const std::string& types() const { return types_; }
  // What cuLaunchKernel takes: the address of each argument's value.
  void** pointers() {
    for (int i = 0; i < count_; ++i) pointers_[i] = &values_[i];
    return pointers_.data();
  }

 private:
  KernelArgs& Add(uint64_t value, const char* type) {
    values_[count_++] = value;
    types_ += types_.empty() ? type : std::string(",") + type;
    return *this;
  }

  std::array<uint64_t, 32> values_{};  // low bytes: the value (little-endian)
  std::array<void*, 32> pointers_{};
  int count_ = 0;
  std::string types_;
};

// A tile kernel's arguments: its tensors, then the table it walks (the
// column-major one: the dK/dV kernel) and the rest of the problem.
KernelArgs TileKernelArgs(std::initializer_list<const void*> tensors,
                          const Problem& p, bool column_major) {
  KernelArgs args;
  for (const void* tensor : tensors) args.Pointer(tensor);
  const LayoutTables& t = p.layout;
  if (column_major) {
    args.Pointer(t.col_ptr).Pointer(t.row_idx).Pointer(t.col_mask_idx);
  } else {
    args.Pointer(t.row_ptr).Pointer(t.col_idx).Pointer(t.mask_idx);
  }
  const AttentionShape& shape = p.shape;
  args.Pointer(t.masks).Pointer(shape.key_lengths)
      .Pointer(shape.key_positions).Float(shape.scale).Int(shape.seq_len)
      .Int(shape.heads).Int(t.table_heads).Int(shape.key_lengths != nullptr)
      .Int(shape.key_positions != nullptr).Int(p.io.original_order)
      .Int(p.io.accumulate).Scratch();
  return args;
}

KernelArgs ForwardKernelArgs(const ForwardArgs& a) {
  return TileKernelArgs({a.q, a.k, a.v, a.out, a.lse, a.stats}, a,
                        /*column_major=*/false);
}

KernelArgs DeltaKernelArgs(const BackwardArgs& a) {
  KernelArgs args;
  args.Pointer(a.out).Pointer(a.dout).Pointer(a.dlse).Pointer(a.delta)
      .Int(a.shape.batch * a.shape.heads * a.shape.seq_len).Scratch();
  return args;
}

KernelArgs DkDvKernelArgs(const BackwardArgs& a) {
  return TileKernelArgs(
      {a.q, a.k, a.v, a.dout, a.stats, a.delta, a.dk, a.dv}, a,
      /*column_major=*/true);
}

KernelArgs DqKernelArgs(const BackwardArgs& a) {
  return TileKernelArgs({a.q, a.k, a.v, a.dout, a.stats, a.delta, a.dq}, a,
                        /*column_major=*/false);
}

// The parameter types the launcher passes to `kernel`.
std::string LauncherTypes(const char* kernel) {
  const ForwardArgs forward;
  const BackwardArgs backward;
  if (std::strcmp(kernel, kForwardKernel) == 0) {
    return ForwardKernelArgs(forward).types();
  }
  if (std::strcmp(kernel, kDeltaKernel) == 0) {
    return DeltaKernelArgs(backward).types();
  }
  if (std::strcmp(kernel, kDkDvKernel) == 0) {
    return DkDvKernelArgs(backward).types();
  }
  if (std::strcmp(kernel, kDqKernel) == 0) {
    return DqKernelArgs(backward).types();
  }
  return "";
}

// The most dynamic shared memory a block may use on each architecture.
int MaxSharedBytes(int arch) { return arch >= 90 ? 227 * 1024 : 163 * 1024; }

// The compiled kernel for the device's compute capability, or null.
// block == 0 matches any block (the delta kernel's ROWS).
const CompiledKernel* FindKernel(const char* kernel, DType dtype, int block,
                                 int64_t head_dim, int arch) {
  for (int i = 0; i < kNumCompiledKernels; ++i) {
    const CompiledKernel& c = kCompiledKernels[i];
    if (std::strcmp(c.kernel, kernel) == 0 &&
        c.dtype == static_cast<int>(dtype) && c.head_dim == head_dim &&
        c.arch == arch && (block == 0 || c.block == block)) {
      return &c;
    }
  }
  return nullptr;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

// What was compiled, as "float16 block 32 head_dim 64 (sm_80, sm_90), ...".
std::string Built() {
  std::map<std::tuple<int, int, int>, std::string> archs;
  for (int i = 0; i < kNumCompiledKernels; ++i) {
    const CompiledKernel& c = kCompiledKernels[i];
    if (std::strcmp(c.kernel, kForwardKernel) != 0) continue;
    std::string& list = archs[{c.dtype, c.block, c.head_dim}];
    list += (list.empty() ? "sm_" : ", sm_") + std::to_string(c.arch);
  }
  std::string out;
  for (const auto& [key, list] : archs) {
    out += (out.empty() ? "" : "; ") +
           std::string(DTypeName(static_cast<DType>(std::get<0>(key)))) +
           " block " + std::to_string(std::get<1>(key)) + " head_dim " +
           std::to_string(std::get<2>(key)) + " (" + list + ")";
  }
  return out.empty() ? "nothing" : out;
}

// Loaded kernels, by compiled entry and device.
class KernelCache {
 public:
  // The function to launch `compiled` on device `device` (whose context is
  // current), loading it the first time.
  std::string Get(const Driver& d, const CompiledKernel& compiled,
                  CUdevice device, CUfunction* fn) {
    std::lock_guard<std::mutex> lock(mu_);
    CUkernel& kernel = kernels_[&compiled];
    if (kernel == nullptr) {
      CUlibrary lib = nullptr;
      ST_RETURN_IF_CUDA(d, d.LibraryLoadData(&lib, compiled.cubin, nullptr,
                                             nullptr, 0, nullptr, nullptr, 0),
                        "cuLibraryLoadData");
      ST_RETURN_IF_CUDA(d, d.LibraryGetKernel(&kernel, lib, compiled.entry),
                        "cuLibraryGetKernel");
    }
    const auto key = std::make_pair(&compiled, device);
    if (compiled.shared_bytes > kDefaultSharedBytes &&
        !shared_set_.count(key)) {
      ST_RETURN_IF_CUDA(
          d, d.KernelSetAttribute(kFuncAttrMaxDynamicSharedBytes,
                                  compiled.shared_bytes, kernel, device),
          "cuKernelSetAttribute(max dynamic shared memory)");
      shared_set_[key] = true;
    }
    ST_RETURN_IF_CUDA(d, d.KernelGetFunction(fn, kernel),
                      "cuKernelGetFunction");
    return "";
  }

 private:
  std::mutex mu_;
  std::map<const CompiledKernel*, CUkernel> kernels_;
  std::map<std::pair<const CompiledKernel*, CUdevice>, bool> shared_set_;
};

KernelCache& Cache() {
  static auto* cache = new KernelCache();
  return *cache;
}

// Launches `kernel` (compiled for `dtype`, `block`, `head_dim`) on a grid of
// grid_x * grid_y programs with `args`, on `stream`.
std::string Launch(const char* kernel, DType dtype, int block,
                   int64_t head_dim, int64_t grid_x, int64_t grid_y,
                   KernelArgs args, void* stream) {
  const Driver& d = GetDriver();
  if (!d.error.empty()) return d.error;
  if (grid_x < 1 || grid_x > 0x7fffffff || grid_y < 1 || grid_y > 65535) {
    return std::string(kernel) + ": grid " + std::to_string(grid_x) + " x " +
           std::to_string(grid_y) + " is out of range (batch * heads must " +
           "be at most 65535)";
  }
  const CUstream s = static_cast<CUstream>(stream);
  ScopedStreamContext context(d, s);
  ST_RETURN_IF_CUDA(d, context.status(), "making the stream's context current");
  CUdevice device = 0;
  int major = 0, minor = 0;
  ST_RETURN_IF_CUDA(d, d.CtxGetDevice(&device), "cuCtxGetDevice");
  ST_RETURN_IF_CUDA(
      d, d.DeviceGetAttribute(&major, kAttrComputeCapabilityMajor, device),
      "cuDeviceGetAttribute");
  ST_RETURN_IF_CUDA(
      d, d.DeviceGetAttribute(&minor, kAttrComputeCapabilityMinor, device),
      "cuDeviceGetAttribute");
  // sm_90a code runs on compute capability 9.0 only; sm_80 code on 8.x.
  const int arch = major == 9 && minor == 0 ? 90 : major == 8 ? 80 : 0;
  const CompiledKernel* compiled =
      arch ? FindKernel(kernel, dtype, block, head_dim, arch) : nullptr;
  if (compiled == nullptr) {
    return std::string("no GPU kernel ") + kernel + " for " +
           DTypeName(dtype) + ", block size " + std::to_string(block) +
           ", head_dim " + std::to_string(head_dim) +
           " on compute capability " + std::to_string(major) + "." +
           std::to_string(minor) + "; built: " + Built();
  }
  if (args.types() != compiled->params) {
    return std::string(kernel) + ": the launcher passes (" + args.types() +
           ") but the kernel takes (" + compiled->params + ")";
  }
  if (compiled->shared_bytes > kDefaultSharedBytes) {
    int available = 0;
    ST_RETURN_IF_CUDA(
        d, d.DeviceGetAttribute(&available, kAttrMaxSharedPerBlockOptin,
                                device),
        "cuDeviceGetAttribute");
    if (compiled->shared_bytes > available) {
      return std::string(kernel) + " needs " +
             std::to_string(compiled->shared_bytes) +
             " bytes of shared memory; the device has " +
             std::to_string(available);
    }
  }
  CUfunction fn = nullptr;
  std::string error = Cache().Get(d, *compiled, device, &fn);
  if (!error.empty()) return error;
  ST_RETURN_IF_CUDA(
      d, d.LaunchKernel(fn, static_cast<unsigned>(grid_x),
                        static_cast<unsigned>(grid_y), 1,
                        32 * compiled->num_warps, 1, 1,
                        compiled->shared_bytes, s, args.pointers(), nullptr),
      kernel);
  return "";
}

// Checks what every kernel needs: compiled kernels, int32 sizes, and the
// permutation when the tensors are in original order.
std::string CheckShape(const AttentionShape& shape, const ComponentIo& io,
                       DType dtype, int block) {
  if (io.original_order && shape.key_positions == nullptr) {
    return "tensors in original order need key_positions (the component's "
           "permutation)";
  }
  if (!HasKernels(dtype, block, shape.head_dim)) {
    return std::string("no GPU kernel for ") + DTypeName(dtype) +
           ", block size " + std::to_string(block) + " and head_dim " +
           std::to_string(shape.head_dim) + "; built: " + Built();
  }
  const int64_t rows = shape.batch * shape.heads * shape.seq_len;
  if (rows > 0x7fffffff) {
    return "batch * heads * n = " + std::to_string(rows) +
           " rows exceed the GPU kernels' int32 row count";
  }
  return "";
}

}  // namespace

bool HasKernels(DType dtype, int64_t block_size, int64_t head_dim) {
  for (int i = 0; i < kNumCompiledKernels; ++i) {
    const CompiledKernel& c = kCompiledKernels[i];
    if (std::strcmp(c.kernel, kForwardKernel) == 0 &&
        c.dtype == static_cast<int>(dtype) && c.block == block_size &&
        c.head_dim == head_dim) {
      return true;
    }
  }
  return false;
}

std::string Forward(const ForwardArgs& a, void* stream) {
  const int block = a.layout.block_size;
  std::string error = CheckShape(a.shape, a.io, a.dtype, block);
  if (!error.empty()) return error;
  return Launch(kForwardKernel, a.dtype, block, a.shape.head_dim,
                a.layout.num_blocks, a.shape.batch * a.shape.heads,
                ForwardKernelArgs(a), stream);
}

std::string Backward(const BackwardArgs& a, void* stream) {
  const int block = a.layout.block_size;
  std::string error = CheckShape(a.shape, a.io, a.dtype, block);
  if (!error.empty()) return error;
  const int64_t rows = a.shape.batch * a.shape.heads * a.shape.seq_len;
  const CompiledKernel* delta = nullptr;
  for (int arch : {90, 80}) {
    delta = delta ? delta
                  : FindKernel(kDeltaKernel, a.dtype, 0, a.shape.head_dim,
                               arch);
  }
  if (delta == nullptr) {
    return std::string("no compiled ") + kDeltaKernel + " kernel for " +
           DTypeName(a.dtype) + ", head_dim " +
           std::to_string(a.shape.head_dim);
  }
  const int64_t bh = a.shape.batch * a.shape.heads;
  if (!a.io.accumulate) {  // else delta holds the previous component's
    error = Launch(kDeltaKernel, a.dtype, delta->block, a.shape.head_dim,
                   (rows + delta->block - 1) / delta->block, 1,
                   DeltaKernelArgs(a), stream);
  }
  if (error.empty()) {
    error = Launch(kDkDvKernel, a.dtype, block, a.shape.head_dim,
                   a.layout.num_blocks, bh, DkDvKernelArgs(a), stream);
  }
  if (error.empty()) {
    error = Launch(kDqKernel, a.dtype, block, a.shape.head_dim,
                   a.layout.num_blocks, bh, DqKernelArgs(a), stream);
  }
  return error;
}

std::string CopyToDevice(void* device, const void* host, size_t bytes,
                         void* stream) {
  const Driver& d = GetDriver();
  if (!d.error.empty()) return d.error;
  if (bytes == 0) return "";
  const CUstream s = static_cast<CUstream>(stream);
  ScopedStreamContext context(d, s);
  ST_RETURN_IF_CUDA(d, context.status(), "making the stream's context current");
  ST_RETURN_IF_CUDA(
      d, d.MemcpyHtoDAsync(reinterpret_cast<CUdeviceptr>(device), host, bytes,
                           s),
      "cuMemcpyHtoDAsync");
  return "";
}

std::string CheckCompiledKernels() {
  if (kNumCompiledKernels == 0) return "no compiled kernels";
  for (int i = 0; i < kNumCompiledKernels; ++i) {
    const CompiledKernel& c = kCompiledKernels[i];
    const std::string where = std::string(c.kernel) + " (dtype " +
                              DTypeName(static_cast<DType>(c.dtype)) +
                              ", block " + std::to_string(c.block) +
                              ", head_dim " + std::to_string(c.head_dim) +
                              ", sm_" + std::to_string(c.arch) + ")";
    const std::string expected = LauncherTypes(c.kernel);
    if (expected.empty()) {
      return where + ": a kernel the launcher does not know";
    }
    if (expected != c.params) {
      return where + ": the launcher passes (" + expected +
             ") but the kernel takes (" + c.params + ")";
    }
    if (c.global_scratch_bytes != 0 || c.profile_scratch_bytes != 0) {
      return where + ": needs scratch memory, which the launcher does not " +
             "allocate";
    }
    if (c.shared_bytes > MaxSharedBytes(c.arch)) {
      return where + ": needs " + std::to_string(c.shared_bytes) +
             " bytes of shared memory, more than sm_" +
             std::to_string(c.arch) + " has";
    }
    if (c.cubin_size == 0 || c.num_warps < 1) {
      return where + ": an empty cubin or no warps";
    }
  }
  return "";
}

}  // namespace gpu
}  // namespace st_keras
