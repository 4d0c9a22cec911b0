# Run once in a separate venv: pip install lifetimes==0.11.3 "pandas<2" "numpy<1.25" "scipy<1.12"
# Not part of the test suite (lifetimes does not run on pandas 3).
import pandas as pd
from lifetimes.utils import summary_data_from_transaction_data

df = pd.read_csv(
    "/work/main/features/data/CDNOW_sample.txt",
    sep=r"\s+",
    header=None,
    names=["customer_id", "sample_id", "date", "cds", "amount"],
    dtype={"date": str},
)
df["date"] = pd.to_datetime(df["date"], format="%Y%m%d")
for end, name in [("1997-09-30", "w39"), ("1998-06-30", "end")]:
    s = summary_data_from_transaction_data(
        df, "customer_id", "date", monetary_value_col="amount", observation_period_end=end, freq="D"
    )
    s = s.reset_index().sort_values("customer_id")
    print(end, len(s), s["frequency"].sum())
    s.to_csv(
        f"/work/main/tests/data/cdnow_sample_lifetimes_{name}.csv", index=False, float_format="%.6f"
    )
