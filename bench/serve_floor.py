"""The floor for bench/serve.py: a minimal aiohttp handler that runs the model inline per
request, speaking the same v2 JSON (no batching, no validation beyond what numpy does).

    python bench/serve_floor.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import torch
from aiohttp import web


def main() -> None:
    model_dir, port = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(f"{model_dir}/model.pt")
    model.eval()
    description = json.load(open(f"{model_dir}/model.json"))  # noqa: PTH123, SIM115

    async def infer(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        tensor = body["inputs"][0]
        array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        with torch.inference_mode():
            output = model(torch.from_numpy(array)).numpy()
        answer = {
            "model_name": description["name"],
            "model_version": description["version"],
            "outputs": [
                {
                    "name": "output",
                    "datatype": "FP32",
                    "shape": list(output.shape),
                    "data": output.ravel().tolist(),
                }
            ],
        }
        return web.Response(body=json.dumps(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    print(json.dumps({"event": "floor.ready", "port": port}), flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
