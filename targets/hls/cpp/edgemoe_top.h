// edgemoe accelerator: the top function (see edgemoe_top.cpp for the operations).
#ifndef EDGEMOE_TOP_H
#define EDGEMOE_TOP_H

#include <stdint.h>

enum { OP_FORWARD = 0, OP_START = 1, OP_EXPERT = 2, OP_NEXT = 3, OP_PREGATE = 4 };

int edgemoe_top(int op, int task, int layer, int expert, int slot, const int16_t *params, const int16_t *pool,
                const int32_t *slots, const int32_t *input, int32_t *output, int32_t *state);

#endif
