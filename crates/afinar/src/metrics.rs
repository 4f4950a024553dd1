//! Evaluation metrics: accuracy, macro-F1, MSE, Pearson.
