"""ComfyUI V3 adapters: thin nodes that translate ComfyUI objects into the kernels' protocols."""

from comfy_api.latest import ComfyExtension, io


def _all_nodes() -> list[type[io.ComfyNode]]:
    from . import (antipure, baselines, customize, danp, identity, ipadapter, loaders, protect, purify, report, sau,
                   scores, tsdf, verify_matrix, verify_sets)

    nodes: list[type[io.ComfyNode]] = []
    for module in (loaders, identity, baselines, antipure, danp, ipadapter, protect, purify, customize, scores,
                   report, sau, tsdf, verify_sets, verify_matrix):
        nodes.extend(module.NODES)
    return nodes


class ImmunizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return _all_nodes()
