// The row-interleaved layouts of common.h, made from and turned back into the file's layout.
// Portable code: runs once per weight at load time (and in tests), never in a decode step.
#include <string.h>

#include "common.h"

namespace tcc {
namespace {

// Q4_K's 12 bytes of packed 6-bit scales and mins, rebuilt from the 8 + 8 values (the inverse of
// k_scale_min: bytes 0-3 hold scales 0-3 with the top bits of scales 4-7 above them, bytes 4-7 the
// same for the mins, bytes 8-11 the low nibbles of scales 4-7 and (high nibble) of mins 4-7).
void pack_k_scales(const uint8_t* sc, const uint8_t* mn, uint8_t* q) {
  for (int j = 0; j < 4; j++) {
    q[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
}

// Byte offset, inside one interleaved block of 16 rows, of row r's chunk c in a region at `base`.
inline int64_t chunk(int64_t base, int c, int r) { return base + 64 * c + 4 * r; }

}  // namespace

void repack_x16(int type, const uint8_t* rows, int64_t rb, int64_t nb, uint8_t* out) {
  const int xb = 16 * x16_block_bytes(type), bb = block_bytes(type);
  for (int64_t b = 0; b < nb; b++) {
    uint8_t* o = out + b * xb;
    for (int r = 0; r < 16; r++) {
      const uint8_t* s = rows + r * rb + b * bb;
      switch (type) {
        case kQ4_0:
        case kQ8_0:
          memcpy(o + 2 * r, s, 2);
          for (int c = 0; c < (type == kQ4_0 ? 4 : 8); c++) memcpy(o + chunk(32, c, r), s + 2 + 4 * c, 4);
          break;
        case kQ4_1:
          memcpy(o + 2 * r, s, 2);
          memcpy(o + 32 + 2 * r, s + 2, 2);
          for (int c = 0; c < 4; c++) memcpy(o + chunk(64, c, r), s + 4 + 4 * c, 4);
          break;
        case kQ5_0:
        case kQ5_1: {
          const int hdr = type == kQ5_1 ? 64 : 32;  // d (and m) arrays before qh
          memcpy(o + 2 * r, s, 2);
          if (type == kQ5_1) memcpy(o + 32 + 2 * r, s + 2, 2);
          memcpy(o + hdr + 4 * r, s + hdr / 16, 4);
          for (int c = 0; c < 4; c++) memcpy(o + chunk(hdr + 64, c, r), s + hdr / 16 + 4 + 4 * c, 4);
          break;
        }
        case kQ4_K:
        case kQ5_K: {
          const int qs = type == kQ5_K ? 48 : 16;
          memcpy(o + 2 * r, s, 2);
          memcpy(o + 32 + 2 * r, s + 2, 2);
          for (int j = 0; j < 8; j++) {
            int sc, mn;
            k_scale_min(j, s + 4, &sc, &mn);
            o[64 + 16 * j + r] = (uint8_t)sc;
            o[192 + 16 * j + r] = (uint8_t)mn;
          }
          for (int p = 0; p < 4; p++)
            for (int c = 0; c < 8; c++) memcpy(o + chunk(320 + 512 * p, c, r), s + qs + 32 * p + 4 * c, 4);
          if (type == kQ5_K)
            for (int c = 0; c < 8; c++) memcpy(o + chunk(2368, c, r), s + 16 + 4 * c, 4);
          break;
        }
        case kQ6_K:
          memcpy(o + 2 * r, s + 208, 2);
          for (int j = 0; j < 16; j++) o[32 + 16 * j + r] = s[192 + j];
          for (int h = 0; h < 2; h++) {
            for (int c = 0; c < 16; c++) memcpy(o + chunk(288 + 1024 * h, c, r), s + 64 * h + 4 * c, 4);
            for (int c = 0; c < 8; c++) memcpy(o + chunk(2336 + 512 * h, c, r), s + 128 + 32 * h + 4 * c, 4);
          }
          break;
      }
    }
  }
}

void unpack_x16_row(int type, const uint8_t* group, int64_t nb, int r, uint8_t* out) {
  const int xb = 16 * x16_block_bytes(type), bb = block_bytes(type);
  for (int64_t b = 0; b < nb; b++) {
    const uint8_t* o = group + b * xb;
    uint8_t* s = out + b * bb;
    switch (type) {
      case kQ4_0:
      case kQ8_0:
        memcpy(s, o + 2 * r, 2);
        for (int c = 0; c < (type == kQ4_0 ? 4 : 8); c++) memcpy(s + 2 + 4 * c, o + chunk(32, c, r), 4);
        break;
      case kQ4_1:
        memcpy(s, o + 2 * r, 2);
        memcpy(s + 2, o + 32 + 2 * r, 2);
        for (int c = 0; c < 4; c++) memcpy(s + 4 + 4 * c, o + chunk(64, c, r), 4);
        break;
      case kQ5_0:
      case kQ5_1: {
        const int hdr = type == kQ5_1 ? 64 : 32;
        memcpy(s, o + 2 * r, 2);
        if (type == kQ5_1) memcpy(s + 2, o + 32 + 2 * r, 2);
        memcpy(s + hdr / 16, o + hdr + 4 * r, 4);
        for (int c = 0; c < 4; c++) memcpy(s + hdr / 16 + 4 + 4 * c, o + chunk(hdr + 64, c, r), 4);
        break;
      }
      case kQ4_K:
      case kQ5_K: {
        const int qs = type == kQ5_K ? 48 : 16;
        memcpy(s, o + 2 * r, 2);
        memcpy(s + 2, o + 32 + 2 * r, 2);
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; j++) { sc[j] = o[64 + 16 * j + r]; mn[j] = o[192 + 16 * j + r]; }
        pack_k_scales(sc, mn, s + 4);
        for (int p = 0; p < 4; p++)
          for (int c = 0; c < 8; c++) memcpy(s + qs + 32 * p + 4 * c, o + chunk(320 + 512 * p, c, r), 4);
        if (type == kQ5_K)
          for (int c = 0; c < 8; c++) memcpy(s + 16 + 4 * c, o + chunk(2368, c, r), 4);
        break;
      }
      case kQ6_K:
        memcpy(s + 208, o + 2 * r, 2);
        for (int j = 0; j < 16; j++) s[192 + j] = o[32 + 16 * j + r];
        for (int h = 0; h < 2; h++) {
          for (int c = 0; c < 16; c++) memcpy(s + 64 * h + 4 * c, o + chunk(288 + 1024 * h, c, r), 4);
          for (int c = 0; c < 8; c++) memcpy(s + 128 + 32 * h + 4 * c, o + chunk(2336 + 512 * h, c, r), 4);
        }
        break;
    }
  }
}

}  // namespace tcc
