#include <cstdio>
int main() { std::puts("barrierlm: under construction"); return 0; }
