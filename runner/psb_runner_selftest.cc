// psb_runner_selftest: checks the runner's self-contained SHA-256 (runner/sha256.cc).
//
//   psb_runner_selftest              # the FIPS 180-4 / NIST known-answer vectors; exit 0 when all pass
//   psb_runner_selftest FILE...      # print "<sha256>  FILE" per file, like sha256sum (fed in odd-sized
//                                    # pieces, to exercise the block buffering)
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "sha256.h"

namespace {

int KnownVectors() {
  struct Vector {
    std::string message;
    const char* digest;
  };
  const std::vector<Vector> vectors = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
      {"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrs"
       "mnopqrstnopqrstu",
       "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"},
      {std::string(1000000, 'a'), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"},
  };
  int failed = 0;
  for (const auto& v : vectors) {
    std::string got = psb_runner::Sha256Hex(v.message.data(), v.message.size());
    // The same message fed in pieces of 1, 63 and 65 bytes must give the same digest.
    for (size_t piece : {size_t{1}, size_t{63}, size_t{65}}) {
      psb_runner::Sha256 h;
      for (size_t i = 0; i < v.message.size(); i += piece)
        h.Update(v.message.data() + i, std::min(piece, v.message.size() - i));
      if (h.HexDigest() != got) got = "pieces of " + std::to_string(piece) + " differ";
    }
    std::string shown = v.message.size() > 20 ? v.message.substr(0, 20) + "... (" +
                                                    std::to_string(v.message.size()) + " bytes)"
                                              : v.message;
    bool ok = got == v.digest;
    failed += !ok;
    std::printf("%s sha256(\"%s\") = %s\n", ok ? "ok  " : "FAIL", shown.c_str(), got.c_str());
  }
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 1) return KnownVectors();
  int rc = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "cannot read %s\n", argv[i]);
      rc = 1;
      continue;
    }
    psb_runner::Sha256 h;
    std::vector<char> buf(4099);
    while (f) {
      f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      h.Update(buf.data(), static_cast<size_t>(f.gcount()));
    }
    std::printf("%s  %s\n", h.HexDigest().c_str(), argv[i]);
  }
  return rc;
}
