// oneDNN's matmul primitive (s8 x s8 -> s32, weights prepacked once) against what torch._int_mm reaches (oneDNN's
// gemm_api, both operands packed on every call): milliseconds per call for the integer engine's GEMM shapes at
// batch 8, length 128 (the three Linear shapes and one head's attention product), and a spot check of exactness.
// Not part of the package (nothing links it): a measurement for the integer engine's next step (README, section
// "Integer-only inference"). Compare with `benchmarks/int_mm_in_engine.py` or a loop of torch._int_mm on the same
// shapes, run in turn on the same machine.
//
// Build and run (oneDNN 3.2 from PyPI, GNU OpenMP build; the C++ header is torch's bundled dnnl.hpp):
//   pip download --no-deps -d /tmp/dnnl_whl onednn-cpu-gomp==2023.2.0 && cd /tmp/dnnl_whl && unzip -q -o *.whl
//   LIB=/tmp/dnnl_whl/onednn_cpu_gomp-2023.2.0.data/data/lib
//   g++ -O2 -std=c++17 -fopenmp -I .venv/lib/python3.11/site-packages/torch/include benchmarks/onednn_matmul.cpp \
//       -o /tmp/onednn_matmul $LIB/libdnnl.so.3 -Wl,-rpath,$LIB && OMP_NUM_THREADS=2 /tmp/onednn_matmul
// Prints per shape: the median of 50 calls, oneDNN's implementation name (brg:avx512_core_amx on a CPU with AMX),
// and the number of mismatches against an int64 dot product on a grid of entries (0 = exact).
#include "dnnl.hpp"
#include <chrono>
#include <cstdio>
#include <vector>
#include <cstdint>
#include <algorithm>
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
int main() {
  engine eng(engine::kind::cpu, 0); stream s(eng);
  int shapes[4][3] = {{1024,384,384},{1024,384,1536},{1024,1536,384},{128,32,128}};
  for (auto& sh : shapes) {
    int M=sh[0],K=sh[1],N=sh[2];
    memory::desc a_md({M,K}, dt::s8, tag::ab), w_any({K,N}, dt::s8, tag::any), w_md({K,N}, dt::s8, tag::ab), c_md({M,N}, dt::s32, tag::ab);
    auto pd = matmul::primitive_desc(eng, a_md, w_any, c_md);
    std::vector<int8_t> A(M*K), W(K*N); std::vector<int32_t> C(M*N), Cref(M*N);
    for (int i=0;i<M*K;i++) A[i]=int8_t((i*37)%255-127); for (int i=0;i<K*N;i++) W[i]=int8_t((i*91)%255-127);
    memory a(a_md, eng, A.data()), w(w_md, eng, W.data()), c(c_md, eng, C.data());
    memory wp(pd.weights_desc(), eng); reorder(w, wp).execute(s, w, wp); s.wait();
    matmul mm(pd);
    auto run=[&]{ mm.execute(s, {{DNNL_ARG_SRC,a},{DNNL_ARG_WEIGHTS,wp},{DNNL_ARG_DST,c}}); s.wait(); };
    for(int i=0;i<5;i++) run();
    std::vector<double> t;
    for(int i=0;i<50;i++){ auto t0=std::chrono::steady_clock::now(); run(); t.push_back(std::chrono::duration<double,std::milli>(std::chrono::steady_clock::now()-t0).count()); }
    std::sort(t.begin(),t.end());
    // check a few entries
    long bad=0; for (int r=0;r<M;r+=97) for (int n=0;n<N;n+=53){ long acc=0; for(int k=0;k<K;k++) acc+=long(A[r*K+k])*W[k*N+n]; bad += acc!=C[r*N+n]; }
    printf("%dx%dx%d matmul %.3f ms  impl=%s  mismatches=%ld\n", M,K,N,t[25], pd.impl_info_str(), bad);
  }
}
