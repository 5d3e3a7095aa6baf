// psb_runner: see psb_runner.h.
#include "psb_runner.h"

#include "sha256.h"

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <utility>

namespace psb_runner {

namespace ffi = tvm::ffi;

namespace {

// ----------------------------------------------------------------------------------- dtypes
struct DTypeEntry {
  const char* name;   // numpy / TVM name
  const char* descr;  // .npy descr written (little-endian, or '|' for one byte)
  DLDataType dl;
};

const DTypeEntry kDTypes[] = {
    {"bool", "|b1", {kDLBool, 8, 1}},       {"int8", "|i1", {kDLInt, 8, 1}},
    {"int16", "<i2", {kDLInt, 16, 1}},      {"int32", "<i4", {kDLInt, 32, 1}},
    {"int64", "<i8", {kDLInt, 64, 1}},      {"uint8", "|u1", {kDLUInt, 8, 1}},
    {"uint16", "<u2", {kDLUInt, 16, 1}},    {"uint32", "<u4", {kDLUInt, 32, 1}},
    {"uint64", "<u8", {kDLUInt, 64, 1}},    {"float16", "<f2", {kDLFloat, 16, 1}},
    {"float32", "<f4", {kDLFloat, 32, 1}},  {"float64", "<f8", {kDLFloat, 64, 1}},
};

const DTypeEntry* FindByName(const std::string& name) {
  for (const auto& e : kDTypes)
    if (name == e.name) return &e;
  return nullptr;
}

const DTypeEntry* FindByDL(DLDataType t) {
  for (const auto& e : kDTypes)
    if (e.dl.code == t.code && e.dl.bits == t.bits && e.dl.lanes == t.lanes) return &e;
  // Older runtimes spell bool as uint1 (stored in one byte).
  if (t.code == kDLUInt && t.bits == 1 && t.lanes == 1) return FindByName("bool");
  return nullptr;
}

std::string SupportedList() {
  std::string s;
  for (const auto& e : kDTypes) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

std::string ShapeStr(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

// Product of dims, with overflow and negative checks.
size_t CheckedNumel(const std::vector<int64_t>& shape, const std::string& what) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw Error(what + ": negative dimension in shape " + ShapeStr(shape));
    if (d != 0 && n > std::numeric_limits<uint64_t>::max() / 4 / static_cast<uint64_t>(d))
      throw Error(what + ": shape " + ShapeStr(shape) + " is too large");
    n *= static_cast<uint64_t>(d);
  }
  return static_cast<size_t>(n);
}

bool HostIsLittleEndian() {
  const uint16_t one = 1;
  unsigned char b;
  std::memcpy(&b, &one, 1);
  return b == 1;
}

// ----------------------------------------------------------------------------------- .npy header
// The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// This parses exactly the subset np.save writes: str keys; str, bool and tuple-of-int values.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  void Parse(std::string* descr, bool* fortran, std::vector<int64_t>* shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    Expect('{');
    while (true) {
      Skip();
      if (Peek() == '}') { ++i_; break; }
      std::string key = ParseString();
      Expect(':');
      Skip();
      if (key == "descr") {
        if (Peek() != '\'' && Peek() != '"')
          Fail("unsupported dtype: structured arrays (a list 'descr') are not supported");
        *descr = ParseString();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran = ParseBool();
        have_fortran = true;
      } else if (key == "shape") {
        *shape = ParseShape();
        have_shape = true;
      } else {
        Fail("unexpected key '" + key + "' in header");
      }
      Skip();
      if (Peek() == ',') { ++i_; continue; }
      Skip();
      if (Peek() == '}') { ++i_; break; }
      Fail("expected ',' or '}' in header");
    }
    Skip();
    if (i_ != s_.size()) Fail("trailing characters after the header dict");
    if (!have_descr || !have_fortran || !have_shape)
      Fail("header lacks one of 'descr', 'fortran_order', 'shape'");
  }

 private:
  [[noreturn]] void Fail(const std::string& msg) {
    throw Error(path_ + ": malformed .npy header (" + msg + "): " + s_);
  }
  void Skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char Peek() { return i_ < s_.size() ? s_[i_] : '\0'; }
  void Expect(char c) {
    Skip();
    if (Peek() != c) Fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string ParseString() {
    Skip();
    char q = Peek();
    if (q != '\'' && q != '"') Fail("expected a string");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != q) {
      if (s_[i_] == '\\') Fail("escapes are not supported");
      out += s_[i_++];
    }
    if (i_ >= s_.size()) Fail("unterminated string");
    ++i_;
    return out;
  }
  bool ParseBool() {
    if (s_.compare(i_, 4, "True") == 0) { i_ += 4; return true; }
    if (s_.compare(i_, 5, "False") == 0) { i_ += 5; return false; }
    Fail("expected True or False");
  }
  std::vector<int64_t> ParseShape() {
    std::vector<int64_t> shape;
    Expect('(');
    while (true) {
      Skip();
      if (Peek() == ')') { ++i_; break; }
      if (!std::isdigit(static_cast<unsigned char>(Peek()))) Fail("expected a non-negative integer in shape");
      int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(Peek()))) {
        int d = s_[i_++] - '0';
        if (v > (std::numeric_limits<int64_t>::max() - d) / 10) Fail("dimension too large");
        v = v * 10 + d;
      }
      if (Peek() == 'L') ++i_;  // Python 2 longs
      shape.push_back(v);
      Skip();
      if (Peek() == ',') { ++i_; continue; }
      Skip();
      if (Peek() == ')') { ++i_; break; }
      Fail("expected ',' or ')' in shape");
    }
    return shape;
  }

  const std::string& s_;
  std::string path_;
  size_t i_ = 0;
};

// Map an .npy descr to one of our dtypes. '<' and '|' are little-endian / byte-order free; '='
// means native, accepted on little-endian hosts only; '>' is rejected.
const DTypeEntry* DTypeFromDescr(const std::string& descr, const std::string& path) {
  if (descr.size() < 3)
    throw Error(path + ": unsupported dtype '" + descr + "' (supported: " + SupportedList() + ")");
  char order = descr[0];
  std::string kind = descr.substr(1);
  if (order == '>' && kind.size() == 2 && kind[1] != '1')
    throw Error(path + ": big-endian data ('" + descr + "') is not supported; save it little-endian "
                "(e.g. arr.astype(arr.dtype.newbyteorder('<')))");
  if (order == '=' && !HostIsLittleEndian())
    throw Error(path + ": native-order descr '" + descr + "' on a big-endian host is not supported");
  if (order != '<' && order != '|' && order != '=' && order != '>')
    throw Error(path + ": unsupported dtype '" + descr + "' (supported: " + SupportedList() + ")");
  for (const auto& e : kDTypes)
    if (kind == std::string(e.descr).substr(1)) return &e;
  throw Error(path + ": unsupported dtype '" + descr + "' (supported: " + SupportedList() + ")");
}

// ----------------------------------------------------------------------------------- files
std::string ErrnoText() { return std::strerror(errno); }

std::string DirOf(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string BaseOf(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string NpyBytes(const HostTensor& t) {
  const DTypeEntry* e = FindByName(t.dtype);
  if (e == nullptr) throw Error("cannot write dtype '" + t.dtype + "' to .npy (supported: " + SupportedList() + ")");
  size_t numel = CheckedNumel(t.shape, "tensor");
  if (t.data.size() != numel * (e->dl.bits / 8))
    throw Error("tensor data size does not match shape " + ShapeStr(t.shape) + " and dtype " + t.dtype);
  std::string dict = std::string("{'descr': '") + e->descr + "', 'fortran_order': False, 'shape': " +
                     ShapeStr(t.shape) + ", }";
  // numpy pads the header with spaces so data starts at a multiple of 64, ending in '\n'.
  std::string out;
  size_t prefix = 6 + 2 + 2;  // magic, version, uint16 length
  int major = 1;
  size_t total = prefix + dict.size() + 1;
  size_t padded = (total + 63) / 64 * 64;
  if (padded - prefix > 65535) {
    major = 2;
    prefix = 6 + 2 + 4;
    total = prefix + dict.size() + 1;
    padded = (total + 63) / 64 * 64;
  }
  size_t header_len = padded - prefix;
  dict.append(header_len - dict.size() - 1, ' ');
  dict += '\n';
  out.append("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += static_cast<char>(0);
  if (major == 1) {
    out += static_cast<char>(header_len & 0xff);
    out += static_cast<char>((header_len >> 8) & 0xff);
  } else {
    for (int i = 0; i < 4; ++i) out += static_cast<char>((header_len >> (8 * i)) & 0xff);
  }
  out += dict;
  out.append(reinterpret_cast<const char*>(t.data.data()), t.data.size());
  return out;
}

// Write all of ``bytes`` to ``fd`` and close it; throws (naming ``path``) on any failure.
void WriteFd(int fd, const std::string& path, const std::string& bytes) {
  size_t done = 0;
  int err = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) {
    errno = err;
    throw Error("cannot write " + path + ": " + ErrnoText());
  }
}

// Create a new, empty temp file next to ``dest`` (mode 0666 & ~umask: what a plain open() of a
// new file gives, default ACLs included).
std::pair<int, std::string> CreateTempNextTo(const std::string& dest) {
  static std::mt19937_64 rng(std::random_device{}() ^ static_cast<uint64_t>(::getpid()));
  // Keep the temp name within NAME_MAX even for a long destination name.
  std::string base = BaseOf(dest).substr(0, 128);
  for (int attempt = 0; attempt < 100; ++attempt) {
    static std::mutex rng_mutex;  // WriteNpyFiles may be called from several threads
    uint64_t r;
    {
      std::lock_guard<std::mutex> lock(rng_mutex);
      r = rng();
    }
    char suffix[32];
    std::snprintf(suffix, sizeof(suffix), ".psb_tmp_%016llx", static_cast<unsigned long long>(r));
    std::string name = DirOf(dest) + "/." + base + suffix;
    int fd = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) return {fd, name};
    if (errno != EEXIST) throw Error("cannot write " + dest + ": " + ErrnoText());
  }
  throw Error("cannot write " + dest + ": no free temp file name");
}

// Where an output path leads (psb_tvm.files.resolve_output): symlinks followed to the file they
// name, which may not exist yet (a dangling link: its target is created, the link kept).
struct OutputTarget {
  enum Kind { kNew, kFile, kStream };
  std::string path;  // as given (for messages)
  std::string real;  // absolute, no symlinks
  Kind kind = kNew;
  mode_t mode = 0;  // kFile: the permissions of the file replaced
};

std::string Realpath(const std::string& path, const std::string& given) {
  char* resolved = realpath(path.c_str(), nullptr);
  if (resolved == nullptr) throw Error("cannot write " + given + ": " + ErrnoText());
  std::string out(resolved);
  std::free(resolved);
  return out;
}

OutputTarget ResolveOutput(const std::string& path) {
  OutputTarget t;
  t.path = path;
  if (path.empty()) throw Error("cannot write '': empty output path");
  std::string cur = path;
  for (int hops = 0;; ++hops) {
    struct stat lst;
    if (lstat(cur.c_str(), &lst) != 0) {
      if (errno == ENOENT) break;  // a new file (perhaps the target of a dangling link)
      throw Error("cannot write " + path + ": " + ErrnoText());
    }
    if (!S_ISLNK(lst.st_mode)) break;
    if (hops >= 40) throw Error("cannot write " + path + ": too many levels of symbolic links");
    char buf[PATH_MAX + 1];
    ssize_t n = readlink(cur.c_str(), buf, PATH_MAX);
    if (n < 0) throw Error("cannot write " + path + ": " + ErrnoText());
    std::string target(buf, static_cast<size_t>(n));
    cur = !target.empty() && target[0] == '/' ? target : DirOf(cur) + "/" + target;
  }
  struct stat st;
  if (stat(cur.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) throw Error("cannot write " + path + ": it is a directory");
    if (S_ISREG(st.st_mode)) {
      t.kind = OutputTarget::kFile;
      t.mode = st.st_mode & 0777;
    } else if (S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode)) {
      t.kind = OutputTarget::kStream;
    } else {
      throw Error("cannot write " + path + ": it is not a regular file, character device or FIFO");
    }
    t.real = Realpath(cur, path);
    return t;
  }
  if (errno != ENOENT) throw Error("cannot write " + path + ": " + ErrnoText());
  if (cur.back() == '/') throw Error("cannot write " + path + ": directory " + cur + " does not exist");
  std::string dir = DirOf(cur);
  struct stat dst;
  if (stat(dir.c_str(), &dst) != 0 || !S_ISDIR(dst.st_mode))
    throw Error("cannot write " + path + ": directory " + dir + " does not exist");
  std::string real_dir = Realpath(dir, path);
  t.real = (real_dir == "/" ? "" : real_dir) + "/" + BaseOf(cur);
  t.kind = OutputTarget::kNew;
  return t;
}

std::vector<OutputTarget> ResolveOutputs(const std::vector<std::string>& paths) {
  std::vector<OutputTarget> targets;
  for (const auto& p : paths) targets.push_back(ResolveOutput(p));
  // Two outputs into one file would leave only the last; a device or FIFO may take several.
  for (size_t i = 0; i < targets.size(); ++i)
    for (size_t j = i + 1; j < targets.size(); ++j)
      if (targets[i].kind != OutputTarget::kStream && targets[i].real == targets[j].real)
        throw Error(targets[i].path == targets[j].path
                        ? "output path given twice: " + targets[i].path
                        : "outputs " + targets[i].path + " and " + targets[j].path + " are the same file");
  return targets;
}

// ----------------------------------------------------------------------------------- non-finite
std::string NonFiniteText(bool nan, bool negative) { return nan ? "nan" : negative ? "-inf" : "inf"; }

// (flat index, "nan" / "inf" / "-inf") of the first non-finite value.
std::optional<std::pair<size_t, std::string>> FindNonFinite(const HostTensor& t) {
  const unsigned char* p = t.data.data();
  if (t.dtype == "float32") {
    for (size_t i = 0; i + 4 <= t.data.size(); i += 4) {
      float v;
      std::memcpy(&v, p + i, 4);
      if (!std::isfinite(v)) return std::make_pair(i / 4, NonFiniteText(std::isnan(v), v < 0));
    }
  } else if (t.dtype == "float64") {
    for (size_t i = 0; i + 8 <= t.data.size(); i += 8) {
      double v;
      std::memcpy(&v, p + i, 8);
      if (!std::isfinite(v)) return std::make_pair(i / 8, NonFiniteText(std::isnan(v), v < 0));
    }
  } else if (t.dtype == "float16") {
    for (size_t i = 0; i + 2 <= t.data.size(); i += 2) {
      uint16_t v = static_cast<uint16_t>(p[i] | (p[i + 1] << 8));  // .npy data is little-endian
      if ((v & 0x7c00) == 0x7c00) return std::make_pair(i / 2, NonFiniteText((v & 0x03ff) != 0, (v & 0x8000) != 0));
    }
  }
  return std::nullopt;
}

// Per-element NaN/infinity test of a float dtype (.npy data is little-endian); nullptr otherwise.
using NonFiniteTest = bool (*)(const unsigned char*);
bool NonFinite16(const unsigned char* p) {
  uint16_t v = static_cast<uint16_t>(p[0] | (p[1] << 8));
  return (v & 0x7c00) == 0x7c00;
}
bool NonFinite32(const unsigned char* p) {
  float v;
  std::memcpy(&v, p, 4);
  return !std::isfinite(v);
}
bool NonFinite64(const unsigned char* p) {
  double v;
  std::memcpy(&v, p, 8);
  return !std::isfinite(v);
}
NonFiniteTest NonFiniteTestFor(const std::string& dtype) {
  if (dtype == "float16") return NonFinite16;
  if (dtype == "float32") return NonFinite32;
  if (dtype == "float64") return NonFinite64;
  return nullptr;
}

// Write numpy's NaN (np.nan cast to the dtype: 0x7e00, 0x7fc00000, 0x7ff8000000000000) over
// ``count`` elements of a float tensor's data from element ``first``.
void FillNaN(HostTensor* t, size_t first, size_t count) {
  size_t size = ItemSize(t->dtype);
  unsigned char nan[8] = {0};
  if (t->dtype == "float16") {
    nan[1] = 0x7e;
  } else if (t->dtype == "float32") {
    nan[2] = 0xc0;
    nan[3] = 0x7f;
  } else {
    nan[6] = 0xf8;
    nan[7] = 0x7f;
  }
  unsigned char* p = t->data.data() + first * size;
  for (size_t i = 0; i < count; ++i) std::memcpy(p + i * size, nan, size);
}

// The C-order multi-index of flat index ``flat`` in ``shape``, formatted like a Python tuple.
std::string IndexStr(size_t flat, const std::vector<int64_t>& shape) {
  std::vector<int64_t> index(shape.size());
  for (size_t k = shape.size(); k-- > 0;) {
    int64_t d = shape[k] > 0 ? shape[k] : 1;
    index[k] = static_cast<int64_t>(flat % static_cast<size_t>(d));
    flat /= static_cast<size_t>(d);
  }
  return ShapeStr(index);
}

// ----------------------------------------------------------------------------------- module record
constexpr char kRecordMagic[8] = {'P', 'S', 'B', 'T', 'V', 'M', '\0', '\1'};
constexpr uint64_t kRecordFooter = 16;           // magic + uint64 JSON length
constexpr uint64_t kMaxRecordJson = 1u << 16;    // the JSON is ~120 bytes
constexpr int64_t kRecordFormat = 1;

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Read exactly ``size`` bytes at ``offset``; false on a short read (the file shrank) or an error.
bool PreadAll(int fd, void* buf, size_t size, uint64_t offset) {
  char* p = static_cast<char*>(buf);
  while (size > 0) {
    ssize_t n = ::pread(fd, p, size, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = 0;  // end of file: the file is shorter than its size said
    if (n <= 0) return false;
    p += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

// ----------------------------------------------------------------------------------- JSON helpers
ffi::Any Field(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key, const std::string& where) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) throw Error("module metadata: " + where + " lacks \"" + key + "\"");
  return (*it).second;
}

std::optional<ffi::Any> OptField(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) return std::nullopt;
  return (*it).second;
}

ffi::Map<ffi::Any, ffi::Any> AsObject(const ffi::Any& v, const std::string& where) {
  auto m = v.as<ffi::Map<ffi::Any, ffi::Any>>();
  if (!m.has_value()) throw Error("module metadata: " + where + " is not a JSON object");
  return *m;
}

ffi::Array<ffi::Any> AsArray(const ffi::Any& v, const std::string& where) {
  auto a = v.as<ffi::Array<ffi::Any>>();
  if (!a.has_value()) throw Error("module metadata: " + where + " is not a JSON list");
  return *a;
}

std::string AsString(const ffi::Any& v, const std::string& where) {
  auto s = v.as<ffi::String>();
  if (!s.has_value()) throw Error("module metadata: " + where + " is not a string");
  return std::string(*s);
}

int64_t AsInt(const ffi::Any& v, const std::string& where) {
  if (v.type_index() != ffi::TypeIndex::kTVMFFIInt)
    throw Error("module metadata: " + where + " is not an integer");
  return v.cast<int64_t>();
}

// ----------------------------------------------------------------------------------- tensors
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t size = ffi::GetDataSize(*t);
    void* p = nullptr;
    if (posix_memalign(&p, 64, size == 0 ? 64 : size) != 0) throw Error("out of memory");
    t->data = p;
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor ToRuntime(const HostTensor& h) {
  const DTypeEntry* e = FindByName(h.dtype);
  if (e == nullptr) throw Error("unsupported dtype " + h.dtype);
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::Shape(h.shape), e->dl,
                                           DLDevice{kDLCPU, 0});
  if (!h.data.empty()) std::memcpy(t.data_ptr(), h.data.data(), h.data.size());
  return t;
}

HostTensor FromRuntime(const ffi::Tensor& t, size_t index) {
  std::string where = "output " + std::to_string(index);
  if (t.device().device_type != kDLCPU) throw Error(where + " is not on the CPU");
  const DTypeEntry* e = FindByDL(t.dtype());
  if (e == nullptr)
    throw Error(where + " has dtype " + std::string(ffi::DLDataTypeToString(t.dtype())) +
                ", which cannot be written to .npy");
  if (!t.IsContiguous()) throw Error(where + " is not contiguous");
  HostTensor h;
  h.dtype = e->name;
  ffi::ShapeView shape = t.shape();
  h.shape.assign(shape.begin(), shape.end());
  size_t bytes = CheckedNumel(h.shape, where) * (e->dl.bits / 8);
  h.data.resize(bytes);
  if (bytes) std::memcpy(h.data.data(), static_cast<const char*>(t.data_ptr()) + t.byte_offset(), bytes);
  return h;
}

std::string FormatFfiError(const ffi::Error& err) { return err.kind() + ": " + err.message(); }

}  // namespace

// ===================================================================================== public
size_t HostTensor::numel() const { return CheckedNumel(shape, "tensor"); }
std::string HostTensor::ShapeString() const { return ShapeStr(shape); }

size_t ItemSize(const std::string& dtype) {
  const DTypeEntry* e = FindByName(dtype);
  if (e == nullptr) throw Error("unsupported dtype '" + dtype + "' (supported: " + SupportedList() + ")");
  return e->dl.bits / 8;
}

std::vector<std::string> SupportedDTypes() {
  std::vector<std::string> out;
  for (const auto& e : kDTypes) out.push_back(e.name);
  return out;
}

HostTensor ReadNpy(const std::string& path) {
  if (!HostIsLittleEndian()) throw Error("the .npy reader supports little-endian hosts only");
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw Error("cannot read " + path + ": " + ErrnoText());
  if (!S_ISREG(st.st_mode)) throw Error("cannot read " + path + ": not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path + ": " + ErrnoText());
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw Error("cannot read " + path + ": I/O error");

  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY", 6) != 0)
    throw Error(path + ": not a .npy file (bad magic; save arrays with numpy.save)");
  int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw Error(path + ": truncated .npy header");
    for (int i = 0; i < 4; ++i) header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    header_start = 12;
  } else {
    throw Error(path + ": unsupported .npy format version " + std::to_string(major) + "." +
                std::to_string(static_cast<unsigned char>(bytes[7])));
  }
  if (bytes.size() < header_start + header_len) throw Error(path + ": truncated .npy header");
  std::string header = bytes.substr(header_start, header_len);

  std::string descr;
  bool fortran = false;
  std::vector<int64_t> shape;
  HeaderParser(header, path).Parse(&descr, &fortran, &shape);
  const DTypeEntry* e = DTypeFromDescr(descr, path);
  if (fortran)
    throw Error(path + ": Fortran-ordered arrays are not supported; save a C-ordered array "
                "(numpy.ascontiguousarray)");

  HostTensor t;
  t.dtype = e->name;
  t.shape = shape;
  size_t nbytes = CheckedNumel(shape, path) * (e->dl.bits / 8);
  size_t data_start = header_start + header_len;
  size_t have = bytes.size() - data_start;
  if (have < nbytes)
    throw Error(path + ": truncated data: shape " + ShapeStr(shape) + " " + e->name + " needs " +
                std::to_string(nbytes) + " bytes, the file has " + std::to_string(have));
  if (have > nbytes)
    throw Error(path + ": " + std::to_string(have - nbytes) + " unexpected bytes after the array data");
  t.data.assign(bytes.begin() + data_start, bytes.end());
  return t;
}

void WriteNpy(const std::string& path, const HostTensor& tensor) { WriteNpyFiles({path}, {tensor}); }

void CheckOutputPaths(const std::vector<std::string>& paths) {
  for (const OutputTarget& t : ResolveOutputs(paths)) {
    if (t.kind == OutputTarget::kStream) {
      if (access(t.real.c_str(), W_OK) != 0) throw Error("cannot write " + t.path + ": " + ErrnoText());
    } else if (access(DirOf(t.real).c_str(), W_OK) != 0) {
      throw Error("cannot write " + t.path + ": directory " + DirOf(t.real) + " is not writable");
    }
  }
}

void WriteNpyFiles(const std::vector<std::string>& paths, const std::vector<HostTensor>& tensors) {
  if (paths.size() != tensors.size())
    throw Error(std::to_string(tensors.size()) + " output tensor(s) but " + std::to_string(paths.size()) +
                " output path(s)");
  std::vector<OutputTarget> targets = ResolveOutputs(paths);
  std::vector<std::string> bodies;
  for (const auto& t : tensors) bodies.push_back(NpyBytes(t));
  std::vector<std::string> temps(paths.size());
  auto cleanup = [&temps]() {
    for (const auto& t : temps)
      if (!t.empty()) std::remove(t.c_str());
  };
  try {
    // 1. Regular files: complete temp files next to their destinations.
    for (size_t i = 0; i < targets.size(); ++i) {
      const OutputTarget& t = targets[i];
      if (t.kind == OutputTarget::kStream) continue;
      auto [fd, name] = CreateTempNextTo(t.real);
      temps[i] = name;
      if (t.kind == OutputTarget::kFile && ::fchmod(fd, t.mode) != 0) {
        int err = errno;
        ::close(fd);
        errno = err;
        throw Error("cannot write " + t.path + ": " + ErrnoText());
      }
      WriteFd(fd, t.path, bodies[i]);
    }
    // 2. Devices and FIFOs: written through, never replaced (no O_CREAT: if one vanished since
    //    it was resolved, this fails rather than leaving a regular file in its place).
    for (size_t i = 0; i < targets.size(); ++i) {
      const OutputTarget& t = targets[i];
      if (t.kind != OutputTarget::kStream) continue;
      int fd = ::open(t.real.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd < 0) throw Error("cannot write " + t.path + ": " + ErrnoText());
      WriteFd(fd, t.path, bodies[i]);
    }
    // 3. Every output is complete; only now do the regular destinations change.
    for (size_t i = 0; i < targets.size(); ++i) {
      if (temps[i].empty()) continue;
      if (std::rename(temps[i].c_str(), targets[i].real.c_str()) != 0)
        throw Error("cannot write " + targets[i].path + ": " + ErrnoText());
      temps[i].clear();
    }
  } catch (...) {
    cleanup();
    throw;
  }
}

std::optional<size_t> FirstNonFinite(const HostTensor& tensor) {
  auto bad = FindNonFinite(tensor);
  if (!bad) return std::nullopt;
  return bad->first;
}

void CheckFinite(const HostTensor& tensor, const std::string& what, const std::string& hint) {
  auto bad = FindNonFinite(tensor);
  if (!bad) return;
  throw Error(what + ": non-finite value " + bad->second + " at index " + IndexStr(bad->first, tensor.shape) +
              (hint.empty() ? "" : " (" + hint + ")"));
}

NonFinite ParseNonFinite(const std::string& name) {
  if (name == "error") return NonFinite::kError;
  if (name == "propagate") return NonFinite::kPropagate;
  throw Error("nonfinite must be one of ('error', 'propagate'), got '" + name + "'");
}

std::string NonFiniteName(NonFinite mode) { return mode == NonFinite::kPropagate ? "propagate" : "error"; }

std::vector<bool> CleanNonFinite(std::vector<HostTensor>* inputs) {
  // B: the leading dimension of every input of rank >= 1 when they all share it, else 1
  // (psb_tvm/runtime.py, PSBModule._nonfinite_items).
  std::optional<int64_t> batch;
  bool common = true;
  for (const auto& t : *inputs) {
    if (t.shape.empty()) continue;
    if (!batch) batch = t.shape[0];
    else if (*batch != t.shape[0]) common = false;
  }
  std::vector<bool> items(static_cast<size_t>(batch && common ? *batch : 1), false);
  for (auto& t : *inputs) {
    NonFiniteTest bad = NonFiniteTestFor(t.dtype);
    if (bad == nullptr) continue;
    size_t size = ItemSize(t.dtype);
    size_t n = t.data.size() / size;
    bool per_item = !t.shape.empty() && static_cast<size_t>(t.shape[0]) == items.size();
    size_t row = per_item && t.shape[0] > 0 ? n / static_cast<size_t>(t.shape[0]) : n;
    for (size_t i = 0; i < n; ++i) {
      unsigned char* p = t.data.data() + i * size;
      if (!bad(p)) continue;
      std::memset(p, 0, size);  // +0, like np.where(bad, dtype.type(0), a)
      if (per_item) {
        items[i / row] = true;
      } else {
        std::fill(items.begin(), items.end(), true);
      }
    }
  }
  return items;
}

void PoisonItems(std::vector<HostTensor>* outputs, const std::vector<bool>& items) {
  if (std::find(items.begin(), items.end(), true) == items.end()) return;
  for (auto& o : *outputs) {
    if (NonFiniteTestFor(o.dtype) == nullptr)
      throw Error("nonfinite='propagate' cannot mark a " + o.dtype + " output NaN; pass finite inputs");
    size_t n = o.data.size() / ItemSize(o.dtype);
    if (!o.shape.empty() && static_cast<size_t>(o.shape[0]) == items.size()) {
      size_t row = o.shape[0] > 0 ? n / static_cast<size_t>(o.shape[0]) : 0;
      for (size_t b = 0; b < items.size(); ++b)
        if (items[b]) FillNaN(&o, b * row, row);
    } else {
      FillNaN(&o, 0, n);
    }
  }
}

ModuleRecord VerifyModule(const std::string& path) {
  // O_NONBLOCK: a FIFO given as the module must not block here (it is refused just below).
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (f.fd < 0) throw Error("cannot open module " + path + ": " + ErrnoText());
  struct stat st;
  if (::fstat(f.fd, &st) != 0) throw Error("cannot open module " + path + ": " + ErrnoText());
  if (!S_ISREG(st.st_mode)) throw Error("cannot open module " + path + ": not a regular file");
  const uint64_t total = static_cast<uint64_t>(st.st_size);
  const std::string no_record =
      path + ": no psb_tvm integrity record at the end of the file: the file is truncated or damaged, or was "
             "not written by PSBModule.export_library (re-export it with this psb_tvm)";
  const std::string bad_record =
      path + ": the integrity record is damaged or does not match the file size (truncated or edited file)";
  if (total < kRecordFooter)
    throw Error(path + ": " + std::to_string(total) + " bytes, too short to be a psb_tvm module (truncated?)");
  unsigned char footer[kRecordFooter];
  if (!PreadAll(f.fd, footer, sizeof(footer), total - kRecordFooter))
    throw Error("cannot read module " + path + ": " + (errno ? ErrnoText() : std::string("short read")));
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= static_cast<uint64_t>(footer[8 + i]) << (8 * i);
  if (std::memcmp(footer, kRecordMagic, 8) != 0 || length == 0 || length > kMaxRecordJson ||
      length > total - kRecordFooter)
    throw Error(no_record);
  std::string text(static_cast<size_t>(length), '\0');
  if (!PreadAll(f.fd, &text[0], text.size(), total - kRecordFooter - length))
    throw Error("cannot read module " + path + ": " + (errno ? ErrnoText() : std::string("short read")));

  ModuleRecord rec;
  try {
    ffi::String err;
    ffi::Any root = ffi::json::Parse(ffi::String(text), &err);
    if (!err.empty()) throw Error(bad_record);
    auto obj = root.as<ffi::Map<ffi::Any, ffi::Any>>();
    if (!obj.has_value()) throw Error(bad_record);
    auto format = OptField(*obj, "format");
    auto bytes = OptField(*obj, "library_bytes");
    auto sha = OptField(*obj, "library_sha256");
    if (!format || !bytes || !sha || format->type_index() != ffi::TypeIndex::kTVMFFIInt ||
        bytes->type_index() != ffi::TypeIndex::kTVMFFIInt || !sha->as<ffi::String>().has_value())
      throw Error(bad_record);
    rec.format = format->cast<int64_t>();
    rec.library_bytes = bytes->cast<int64_t>();
    rec.library_sha256 = std::string(*sha->as<ffi::String>());
  } catch (const ffi::Error&) {
    throw Error(bad_record);
  }
  if (rec.format != kRecordFormat)
    throw Error(path + ": integrity record format " + std::to_string(rec.format) + ", this runner reads format " +
                std::to_string(kRecordFormat) + " (re-export the module, or use a matching psb_run)");
  bool hex = rec.library_sha256.size() == 64 &&
             rec.library_sha256.find_first_not_of("0123456789abcdef") == std::string::npos;
  if (!hex || rec.library_bytes < 0 || static_cast<uint64_t>(rec.library_bytes) != total - kRecordFooter - length)
    throw Error(bad_record);

  Sha256 digest;
  std::vector<unsigned char> buf(1 << 20);
  uint64_t offset = 0, left = static_cast<uint64_t>(rec.library_bytes);
  while (left > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(left, buf.size()));
    if (!PreadAll(f.fd, buf.data(), n, offset))
      throw Error("cannot read module " + path + ": " + (errno ? ErrnoText() : std::string("short read")));
    digest.Update(buf.data(), n);
    offset += n;
    left -= n;
  }
  if (digest.HexDigest() != rec.library_sha256)
    throw Error(path + ": SHA-256 mismatch: the module was damaged or edited after export (re-export or copy "
                       "it again)");
  return rec;
}

Metadata ParseMetadata(const std::string& json) {
  Metadata md;
  md.json = json;
  ffi::String err;
  ffi::Any root;
  try {
    root = ffi::json::Parse(ffi::String(json), &err);
  } catch (const ffi::Error& e) {
    throw Error("module metadata is not valid JSON: " + e.message());
  }
  if (!err.empty()) throw Error("module metadata is not valid JSON: " + std::string(err));
  auto obj = AsObject(root, "the top level");
  // psb_tvm.metadata.FORMAT_VERSION: absent in modules written before it existed (version 0).
  if (auto fv = OptField(obj, "format_version")) {
    int64_t version = AsInt(*fv, "\"format_version\"");
    if (version > kMetadataFormatVersion)
      throw Error("module metadata format_version " + std::to_string(version) +
                  " was written by a newer psb_tvm; this runner reads up to " +
                  std::to_string(kMetadataFormatVersion) + " (rebuild psb_run from the newer psb_tvm)");
  }
  auto inputs = AsArray(Field(obj, "inputs", "the top level"), "\"inputs\"");
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::string where = "inputs[" + std::to_string(i) + "]";
    auto in = AsObject(inputs[i], where);
    TensorInfo info;
    info.name = AsString(Field(in, "name", where), where + ".name");
    info.dtype = AsString(Field(in, "dtype", where), where + ".dtype");
    auto shape = AsArray(Field(in, "shape", where), where + ".shape");
    for (size_t k = 0; k < shape.size(); ++k) {
      int64_t d = AsInt(shape[k], where + ".shape[" + std::to_string(k) + "]");
      if (d < 0) throw Error("module metadata: " + where + " has a dynamic or negative dimension");
      info.shape.push_back(d);
    }
    md.inputs.push_back(std::move(info));
  }
  if (auto outs = OptField(obj, "outputs")) {
    auto arr = AsArray(*outs, "\"outputs\"");
    for (size_t i = 0; i < arr.size(); ++i) md.outputs.push_back(AsString(arr[i], "outputs[" + std::to_string(i) + "]"));
  }
  md.samples = AsInt(Field(obj, "samples", "the top level"), "\"samples\"");
  md.seed = AsInt(Field(obj, "seed", "the top level"), "\"seed\"");
  // A module compiled with a per-layer map of n: its defaults, in the order of "psb_layers".
  if (auto ls = OptField(obj, "layer_samples")) {
    auto per_layer = AsObject(*ls, "\"layer_samples\"");
    auto names = AsArray(Field(obj, "psb_layers", "the top level"), "\"psb_layers\"");
    for (size_t i = 0; i < names.size(); ++i) {
      std::string name = AsString(names[i], "psb_layers[" + std::to_string(i) + "]");
      auto n = OptField(per_layer, name.c_str());
      md.layer_samples.push_back(n ? AsInt(*n, "layer_samples[\"" + name + "\"]") : md.samples);
    }
  }
  if (auto nm = OptField(obj, "n_max")) {
    md.n_max = AsInt(*nm, "\"n_max\"");
  } else if (auto cfg = OptField(obj, "config")) {
    auto c = AsObject(*cfg, "\"config\"");
    if (auto cnm = OptField(c, "n_max")) md.n_max = AsInt(*cnm, "config.n_max");
  }
  if (auto fz = OptField(obj, "frozen")) {
    auto b = fz->as<bool>();
    if (!b.has_value()) throw Error("module metadata: \"frozen\" is not a boolean");
    md.frozen = *b;
  }
  // "runtime_args" lists the arguments of main after the model inputs; absent or empty: n and the
  // seed are fixed at compile time (frozen modules, modules without PSB layers, older modules).
  if (auto ra = OptField(obj, "runtime_args")) {
    auto arr = AsArray(*ra, "\"runtime_args\"");
    for (size_t i = 0; i < arr.size(); ++i) {
      std::string where = "runtime_args[" + std::to_string(i) + "]";
      auto a = AsObject(arr[i], where);
      RuntimeArgInfo info;
      info.name = AsString(Field(a, "name", where), where + ".name");
      info.kind = AsString(Field(a, "kind", where), where + ".kind");
      if (info.kind == "shape") {
        info.length = AsInt(Field(a, "length", where), where + ".length");
        if (info.length < 0) throw Error("module metadata: " + where + ".length is negative");
      } else if (info.kind != "int" && md.unsupported.empty()) {
        md.unsupported = "the module's " + where + " has kind \"" + info.kind +
                         "\"; this runner can pass \"shape\" and \"int\" arguments only";
      }
      if (info.name != "samples" && info.name != "seed" && md.unsupported.empty())
        md.unsupported = "main takes a run-time argument \"" + info.name +
                         "\"; this runner can pass only \"samples\" and \"seed\"";
      md.runtime_args.push_back(info);
    }
    md.has_runtime_args = !md.runtime_args.empty();
  }
  return md;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// ===================================================================================== Model
struct Model::Impl {
  ffi::Optional<ffi::Module> lib;
  ffi::Optional<ffi::Module> vm;
  ffi::Optional<ffi::Function> main;
  Metadata md;

  // kError: throw on a NaN/infinity; returns {}. kPropagate: when an input has any, ``*cleaned``
  // gets the inputs with them set to 0 (run on those) and the batch items to mark are returned;
  // else ``*cleaned`` stays empty (run on ``inputs``) and {} is returned.
  std::vector<bool> CheckValues(const std::vector<HostTensor>& inputs, const RunOptions& opt,
                                std::vector<HostTensor>* cleaned) const;

  std::vector<ffi::Any> Args(const std::vector<HostTensor>& inputs, const RunOptions& opt) {
    std::vector<ffi::Any> args;
    for (const auto& h : inputs) args.emplace_back(ToRuntime(h));
    for (const auto& ra : md.runtime_args) {
      int64_t value = ra.name == "samples" ? opt.samples.value_or(md.samples) : opt.seed.value_or(md.seed);
      bool per_layer = ra.name == "samples" && !opt.samples && ra.kind == "shape" &&
                       md.layer_samples.size() == static_cast<size_t>(ra.length) && !md.layer_samples.empty();
      if (per_layer) {  // no --samples: the compiled per-layer defaults
        args.emplace_back(ffi::Shape(md.layer_samples));
      } else if (ra.kind == "shape") {
        args.emplace_back(ffi::Shape(std::vector<int64_t>(static_cast<size_t>(ra.length), value)));
      } else {
        args.emplace_back(value);
      }
    }
    return args;
  }

  ffi::Any Call(const std::vector<ffi::Any>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any rv;
    try {
      main.value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
    } catch (const ffi::Error& e) {
      throw Error("running main failed: " + FormatFfiError(e));
    }
    return rv;
  }
};

Model::Model(const std::string& path) : impl_(new Impl()) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw Error("cannot open module " + path + ": " + ErrnoText());
  if (!S_ISREG(st.st_mode)) throw Error("cannot open module " + path + ": not a regular file");
  // Before the dynamic loader maps the file or runs any of its code: a truncated copy would crash
  // it (SIGBUS), a flipped bit could run and give wrong outputs.
  VerifyModule(path);
  // dlopen searches the library path for names without a slash: always pass an absolute path.
  char* resolved = realpath(path.c_str(), nullptr);
  if (resolved == nullptr) throw Error("cannot open module " + path + ": " + ErrnoText());
  std::string abs_path(resolved);
  std::free(resolved);
  try {
    impl_->lib = ffi::Module::LoadFromFile(abs_path);
  } catch (const ffi::Error& e) {
    throw Error(path + ": cannot load as a TVM module: " + FormatFfiError(e));
  }
  try {
    ffi::Optional<ffi::Function> load = impl_->lib.value()->GetFunction("vm_load_executable", true);
    if (!load.has_value())
      throw Error(path + ": not a psb_tvm module (no Relax VM executable inside; is libtvm_runtime "
                  "linked with --no-as-needed?)");
    impl_->vm = (*load)().cast<ffi::Module>();
    ffi::Optional<ffi::Function> init = impl_->vm.value()->GetFunction("vm_initialization", false);
    if (!init.has_value()) throw Error(path + ": the Relax VM lacks vm_initialization");
    constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
    (*init)(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    ffi::Optional<ffi::Function> meta = impl_->vm.value()->GetFunction("psb_metadata", false);
    if (!meta.has_value()) throw Error(path + ": not a psb_tvm module (it has no psb_metadata function)");
    ffi::Any text = (*meta)();
    auto s = text.as<ffi::String>();
    if (!s.has_value()) throw Error(path + ": not a psb_tvm module (psb_metadata() did not return a string)");
    impl_->md = ParseMetadata(std::string(*s));
    ffi::Optional<ffi::Function> main = impl_->vm.value()->GetFunction("main", false);
    if (!main.has_value()) throw Error(path + ": the module has no main function");
    impl_->main = main;
  } catch (const ffi::Error& e) {
    throw Error(path + ": not a usable psb_tvm module: " + FormatFfiError(e));
  } catch (const Error& e) {
    std::string msg = e.what();
    if (msg.rfind(path, 0) == 0) throw;
    throw Error(path + ": " + msg);
  }
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const Metadata& Model::metadata() const { return impl_->md; }

void Model::CheckInputs(const std::vector<HostTensor>& inputs) const {
  const auto& exp = impl_->md.inputs;
  if (inputs.size() != exp.size()) {
    std::string names;
    for (const auto& i : exp) names += (names.empty() ? "" : ", ") + i.name;
    throw Error("expected " + std::to_string(exp.size()) + " input(s) [" + names + "], got " +
                std::to_string(inputs.size()));
  }
  for (size_t i = 0; i < exp.size(); ++i) {
    if (inputs[i].dtype != exp[i].dtype)
      throw Error("input '" + exp[i].name + "': expected dtype " + exp[i].dtype + ", got " + inputs[i].dtype);
    if (inputs[i].shape != exp[i].shape)
      throw Error("input '" + exp[i].name + "': expected shape " + ShapeStr(exp[i].shape) + ", got " +
                  ShapeStr(inputs[i].shape));
    if (inputs[i].data.size() != inputs[i].numel() * ItemSize(inputs[i].dtype))
      throw Error("input '" + exp[i].name + "': data size does not match its shape");
  }
}

void Model::CheckOptions(const RunOptions& opt) const {
  const Metadata& md = impl_->md;
  if (!md.unsupported.empty()) throw Error("cannot run this module: " + md.unsupported);
  if (!opt.samples && !opt.seed) return;
  if (!md.has_runtime_args)
    throw Error("this module fixes n and seed at compile time (samples=" + std::to_string(md.samples) +
                ", seed=" + std::to_string(md.seed) + (md.frozen ? ", frozen" : "") +
                "); --samples/--seed need a module with run-time sample control (metadata "
                "\"runtime_args\"; psb_tvm.compile without frozen=True)");
  auto has = [&md](const char* name) {
    for (const auto& a : md.runtime_args)
      if (a.name == name) return true;
    return false;
  };
  if (opt.samples) {
    if (!has("samples")) throw Error("this module fixes samples=" + std::to_string(md.samples) + " at compile time");
    int64_t n = *opt.samples;
    if (n < 1 || (n & (n - 1)) != 0) throw Error("samples must be a power of two >= 1, got " + std::to_string(n));
    if (md.n_max > 0 && n > md.n_max)
      throw Error("samples=" + std::to_string(n) + " exceeds n_max=" + std::to_string(md.n_max) +
                  " fixed at compile time");
  }
  if (opt.seed) {
    if (!has("seed")) throw Error("this module fixes seed=" + std::to_string(md.seed) + " at compile time");
    if (*opt.seed < 0 || *opt.seed >= (int64_t{1} << 32))
      throw Error("seed must be in [0, 2**32), got " + std::to_string(*opt.seed));
  }
}

std::vector<bool> Model::Impl::CheckValues(const std::vector<HostTensor>& inputs, const RunOptions& opt,
                                           std::vector<HostTensor>* cleaned) const {
  if (opt.nonfinite == NonFinite::kError) {
    for (size_t i = 0; i < inputs.size() && i < md.inputs.size(); ++i)
      CheckFinite(inputs[i], "input '" + md.inputs[i].name + "'",
                  "set RunOptions::nonfinite = NonFinite::kPropagate to get NaN outputs for such batch "
                  "items instead");
    return {};
  }
  bool any = false;
  for (const auto& t : inputs) any = any || FindNonFinite(t).has_value();
  if (!any) return {};  // nothing to clean: run on ``inputs`` themselves, no copy
  *cleaned = inputs;
  return CleanNonFinite(cleaned);
}

namespace {
// The outputs of a call: one tensor, or the fields of a tuple of tensors.
std::vector<HostTensor> Outputs(const ffi::Any& rv, const std::string& function) {
  std::vector<HostTensor> out;
  try {
    if (auto t = rv.as<ffi::Tensor>()) {
      out.push_back(FromRuntime(*t, 0));
    } else if (auto arr = rv.as<ffi::Array<ffi::Any>>()) {
      for (size_t i = 0; i < arr->size(); ++i) {
        auto ti = (*arr)[i].as<ffi::Tensor>();
        if (!ti.has_value())
          throw Error("output " + std::to_string(i) + " is a " + (*arr)[i].GetTypeKey() + ", not a tensor");
        out.push_back(FromRuntime(*ti, i));
      }
    } else {
      throw Error(function + " returned a " + rv.GetTypeKey() + ", not a tensor or a tuple of tensors");
    }
  } catch (const ffi::Error& e) {
    throw Error("reading the outputs failed: " + FormatFfiError(e));
  }
  return out;
}
}  // namespace

std::vector<HostTensor> Model::Run(const std::vector<HostTensor>& inputs, const RunOptions& opt) {
  CheckInputs(inputs);
  CheckOptions(opt);
  std::vector<HostTensor> cleaned;
  std::vector<bool> items = impl_->CheckValues(inputs, opt, &cleaned);
  std::vector<HostTensor> out = Outputs(impl_->Call(impl_->Args(cleaned.empty() ? inputs : cleaned, opt)), "main");
  PoisonItems(&out, items);
  return out;
}

std::vector<HostTensor> Model::CallFunction(const std::string& name, const std::vector<CallArg>& args) {
  ffi::Optional<ffi::Function> func = impl_->vm.value()->GetFunction(name, false);
  if (!func.has_value()) throw Error("the module has no function " + name);
  std::vector<ffi::Any> values;
  for (const CallArg& a : args) {
    if (a.tensor.has_value()) {
      values.push_back(ToRuntime(*a.tensor));
    } else {
      values.push_back(ffi::Shape(a.shape));
    }
  }
  std::vector<ffi::AnyView> views(values.begin(), values.end());
  ffi::Any rv;
  try {
    func.value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
  } catch (const ffi::Error& e) {
    throw Error("running " + name + " failed: " + FormatFfiError(e));
  }
  return Outputs(rv, name);
}

std::vector<double> Model::Time(const std::vector<HostTensor>& inputs, int repeats, const RunOptions& opt) {
  CheckInputs(inputs);
  CheckOptions(opt);
  std::vector<HostTensor> cleaned;
  std::vector<bool> items = impl_->CheckValues(inputs, opt, &cleaned);
  std::vector<ffi::Any> args = impl_->Args(cleaned.empty() ? inputs : cleaned, opt);
  impl_->Call(args);  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    ffi::Any rv = impl_->Call(args);
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return ms;
}

}  // namespace psb_runner
