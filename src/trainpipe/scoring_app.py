"""The app `trainpipe serve` runs: MLflow's own scoring server (`mlflow models serve` runs
the same app under uvicorn), with two differences: CSV bodies, and a POST without a
Content-Type, which MLflow's app answers with a 500 (it splits the missing header).

A trainpipe model reads its columns as a source holds them (dates as text, ints where floats
were, bool spellings) as well as typed, so its signature leaves most columns untyped. MLflow
parses a CSV body with the signature's pandas types and cannot for an untyped column. Here
such a body is read as trainpipe reads a CSV file: every cell as its text, an empty cell
missing, which the model's first step parses as it parsed the training data.
"""

import os

import pandas as pd
from mlflow.pyfunc import scoring_server
from mlflow.types.schema import DataType

MLFLOWS_CSV_PARSER = scoring_server.parse_csv_input


def parse_csv_input(csv_input, schema=None):
    if schema is None or all(isinstance(spec.type, DataType) for spec in schema.inputs):
        return MLFLOWS_CSV_PARSER(csv_input, schema)
    try:
        # Typed columns (ints) as MLflow reads them; the others as their text.
        types = {spec.name: spec.type.to_pandas() if isinstance(spec.type, DataType) else str
                 for spec in schema.inputs}
        return pd.read_csv(csv_input, dtype=types, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - MLflow's own answer: 400 naming the problem
        scoring_server._handle_serving_error(
            error_message=f"Failed to parse input as a CSV table: {exc}",
            error_code=scoring_server.BAD_REQUEST)


scoring_server.parse_csv_input = parse_csv_input  # what `invocations` calls
app = scoring_server.init(scoring_server.load_model_with_mlflow_config(
    os.environ[scoring_server._SERVER_MODEL_PATH]))


@app.middleware("http")
async def content_type_required(request, call_next):
    if request.method == "POST" and "content-type" not in request.headers:
        from fastapi.responses import JSONResponse

        return JSONResponse(status_code=415, content={
            "error_code": "BAD_REQUEST",
            "message": "the request has no Content-Type header: send application/json "
                       "(dataframe_split, dataframe_records, instances, inputs), text/csv or "
                       "application/vnd.apache.parquet"})
    return await call_next(request)
