// Python entry point of `deformable_detr._C`. The module itself is empty: importing it loads
// this shared library, whose static initializers register the `torch.ops.deformable_detr` ops.
#include <Python.h>

static PyModuleDef deformable_detr_c_module = {
    PyModuleDef_HEAD_INIT,
    "deformable_detr._C",
    "Registers torch.ops.deformable_detr.ms_deform_attn_{forward,backward} on import.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&deformable_detr_c_module);
}
