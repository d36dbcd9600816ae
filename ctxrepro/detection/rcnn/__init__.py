"""R-CNN (Girshick et al. 2014), the protocol of Table 1's R-CNN rows (paper section 4.3: "We fine-tune this
network according to the procedure described in [21] ... We do not use bounding-box regression").

- `warp`: each proposal cropped with context padding and warped to the network's input (rcnn_im_crop).
- `windows`: fine-tuning batches of warped windows (Caffe's window_data layer), a pure function of the iteration.
- `net`: a converted network (Figure 6, or CaffeNet / AlexNet) run on windows: fc7 features, fc8 scores.
- `finetune`: resumable SGD on the windows (softmax over 21 classes).
- `features`: fc7 of every window of an image, streamed in batches and cached per image.
- `svm`: one linear SVM per class on scaled fc7, with one epoch of hard-negative mining (rcnn_train.m).
- `protocol`: the whole R-CNN run of one row: fine-tune, features, SVMs, test detections.
"""
