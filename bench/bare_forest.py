"""The bare baseline: trainpipe's random-forest run done by hand, with no tracking.

Same data, same split (seed 42, 15% test then 15% validation, stratified), same estimator
as `trainpipe run model=random_forest`; the model is dumped with joblib to a temp file.
Prints the test ROC AUC.

    python bench/bare_forest.py PATH/TO/train.csv
"""

import sys
import tempfile
from pathlib import Path

import joblib
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

TARGET = "booking_status"
SEED = 42
VAL_SIZE = TEST_SIZE = 0.15


def main(data: str) -> float:
    df = pd.read_csv(data)
    rest, test = train_test_split(df, test_size=TEST_SIZE, random_state=SEED,
                                  stratify=df[TARGET])
    train, _val = train_test_split(rest, test_size=VAL_SIZE / (1 - TEST_SIZE),
                                   random_state=SEED, stratify=rest[TARGET])
    drop = ["id", TARGET]
    model = RandomForestClassifier(n_estimators=200, max_depth=15, n_jobs=-1,
                                   random_state=SEED)
    model.fit(train.drop(columns=drop), train[TARGET])
    auc = roc_auc_score(test[TARGET], model.predict_proba(test.drop(columns=drop))[:, 1])
    with tempfile.TemporaryDirectory() as tmp:
        joblib.dump(model, Path(tmp) / "model.joblib")
    return float(auc)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bare_forest.py PATH/TO/train.csv")
    print(f"test_roc_auc {main(sys.argv[1]):.4f}")
